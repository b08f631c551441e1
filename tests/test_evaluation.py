"""Evaluation: metrics on hand-made inputs, the shipped segmenter, and the eval plumbing on tiny models."""
from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from taming_deploy.errors import UserError
from taming_deploy.spec import ConditionSpec
from taming_deploy.training.checkpoint import save_checkpoint
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.data.sources import VALIDATION_SEED_BASE
from taming_deploy.training.data.synthetic_landscapes import LABELS, PALETTE, render_scene
from taming_deploy.training.evaluation import evaluate as ev
from taming_deploy.training.evaluation.metrics import (
    confusion_matrix,
    mean_iou,
    per_class_iou,
    pixel_accuracy,
    psnr,
    psnr_per_image,
    segmentation_scores,
)
from taming_deploy.training.evaluation.segmenter import (
    TRAIN_SEED_BASE,
    Segmenter,
    load_segmenter,
    read_segmenter_info,
    render_batch,
    save_segmenter,
    score_segmenter,
    segment,
    validation_seeds,
)
from taming_deploy.training.models.gpt import GPTConfig
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.models.vqgan import AutoencoderConfig

TINY_AE = dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), in_channels=3, out_ch=3,
               resolution=32, z_channels=8, embed_dim=8, n_embed=32)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Small models on a shared 2-core machine run up to 100x faster on one torch thread (see torch_threads)."""
    with ev.torch_threads(1):
        yield


# --- metrics ---------------------------------------------------------------------------------------------


def test_psnr_of_a_known_mse_per_image_then_mean():
    reference = np.zeros((2, 3, 4, 4))
    images = reference.copy()
    images[0] += 0.02  # MSE 4e-4 -> 10 log10(4 / 4e-4) = 40 dB
    images[1, :, :2] += 0.2  # half the pixels off by 0.2: MSE 0.02 -> 10 log10(200) = 23.0103 dB
    np.testing.assert_allclose(psnr_per_image(images, reference), [40.0, 10 * math.log10(200)], atol=1e-9)
    assert psnr(images, reference) == pytest.approx((40.0 + 10 * math.log10(200)) / 2)
    # the same numbers as the usual 0..255 definition
    as_uint = (images + 1) * 127.5
    on_255 = psnr(torch.from_numpy(as_uint), torch.from_numpy((reference + 1) * 127.5), peak_to_peak=255)
    assert on_255 == pytest.approx(psnr(images, reference))
    assert psnr_per_image(reference, reference)[0] == math.inf
    with pytest.raises(ValueError):
        psnr(images, reference[:1])


def test_confusion_accuracy_and_miou_of_a_hand_made_case():
    target = np.array([[0, 0, 1, 1], [2, 2, 2, 2]])
    pred = np.array([[0, 1, 1, 1], [2, 2, 0, 2]])
    cm = confusion_matrix(pred, target, n_classes=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 3, 0], [0, 0, 0, 0]]
    assert pixel_accuracy(cm) == pytest.approx(6 / 8)
    # IoU: class 0 = 1 / (2 + 2 - 1) = 1/3; class 1 = 2 / (2 + 3 - 2) = 2/3; class 2 = 3 / (4 + 3 - 3) = 3/4;
    # class 3 absent from both: left out of the mean (not counted as 0 or 1)
    iou = per_class_iou(cm)
    np.testing.assert_allclose(iou[:3], [1 / 3, 2 / 3, 3 / 4])
    assert math.isnan(iou[3])
    assert mean_iou(cm) == pytest.approx((1 / 3 + 2 / 3 + 3 / 4) / 3)
    scores = segmentation_scores(cm, ("a", "b", "c", "d"))
    assert scores["per_class_iou"]["d"] is None and scores["pixels"] == 8


def test_a_class_only_predicted_or_only_in_the_target_counts_as_zero():
    target = np.array([0, 0, 0, 0])
    only_predicted = confusion_matrix(np.array([0, 0, 0, 1]), target, 3)  # class 1 hallucinated
    assert mean_iou(only_predicted) == pytest.approx((3 / 4 + 0) / 2)
    missed = confusion_matrix(np.array([1, 1, 1, 1]), np.array([0, 0, 1, 1]), 3)  # class 0 never predicted
    assert per_class_iou(missed)[0] == 0 and mean_iou(missed) == pytest.approx((0 + 0.5) / 2)
    assert math.isnan(mean_iou(np.zeros((3, 3), np.int64))) and math.isnan(pixel_accuracy(np.zeros((3, 3))))
    with pytest.raises(ValueError):
        confusion_matrix(np.array([3]), np.array([0]), 3)


# --- segmenter ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return load_segmenter()


def test_shipped_segmenter_labels_held_out_scenes(segmenter):
    info = read_segmenter_info()
    assert info["recipe"]["seed"] is not None and info["scores"]["validation_256x256"]["miou"] > 0.9
    assert sum(p.numel() for p in segmenter.parameters()) < 500_000
    scores = score_segmenter(segmenter, count=4, height=256, width=256)
    assert scores["pixel_accuracy"] > 0.95 and scores["miou"] > 0.85
    wide = score_segmenter(segmenter, count=2, height=256, width=512)
    assert wide["pixel_accuracy"] > 0.95


def test_segmenter_training_seeds_are_disjoint_from_training_and_validation():
    assert TRAIN_SEED_BASE >= 2**31 and TRAIN_SEED_BASE > VALIDATION_SEED_BASE + 2**32


def test_segmenter_reads_the_image_not_a_prior(segmenter):
    """Scored against the label maps of other scenes, the same pictures must score far lower."""
    images, labels = render_batch(validation_seeds(4), 256, 256)
    seen = segment(segmenter, images)
    matched = mean_iou(confusion_matrix(seen, labels, 8))
    shifted = mean_iou(confusion_matrix(seen, np.roll(labels.numpy(), 1, axis=0), 8))
    assert matched > 0.85 and shifted < matched - 0.3


def test_segmenter_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = Segmenter().eval()
    save_segmenter(tmp_path / "seg", model, {"note": "test"})
    again = load_segmenter(tmp_path / "seg")
    x = torch.rand(1, 3, 40, 72) * 2 - 1  # not a multiple of 16: padded inside, cropped back
    with torch.no_grad():
        assert again(x).shape == (1, 8, 40, 72)
        torch.testing.assert_close(again(x), model(x))
    assert not list(tmp_path.glob("seg/*.pt")) and json.loads((tmp_path / "seg/segmenter.json").read_text())["note"] == "test"
    (tmp_path / "seg/segmenter.json").write_text("{}")
    with pytest.raises(UserError):
        load_segmenter(tmp_path / "seg")


def test_segmenter_training_is_reproducible_from_its_seed(tmp_path):
    from safetensors.torch import load_file

    from taming_deploy.training.evaluation.segmenter import TrainRecipe, main, train_segmenter

    main(["--out", str(tmp_path / "a"), "--steps", "2", "--pixels-per-batch", "1", "--validation-count", "1"])
    _, info = train_segmenter(TrainRecipe(steps=2, pixels_per_batch=1, validation_count=1), tmp_path / "b", log=lambda _: None)
    a, b = (load_file(str(tmp_path / d / "segmenter.safetensors")) for d in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    torch.manual_seed(0)  # the initialisation train_segmenter starts from with seed 0
    assert not torch.equal(a["head.weight"], Segmenter().state_dict()["head.weight"])  # it did train
    assert info["scores"]["validation_256x256"]["count"] == 1 and "--steps 2" in info["reproduce"]


# --- reconstruction ----------------------------------------------------------------------------------------


def test_reconstruction_of_a_tiny_untrained_first_stage(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(first_stage=AutoencoderConfig(**TINY_AE))
    save_checkpoint(tmp_path / "vq", config, TamingModel(config).state_dict())
    result = ev.evaluate_reconstruction(tmp_path / "vq", count=3, size=32, batch_size=2)
    assert result["count"] == 3 and result["runner"] == "torch"
    assert math.isfinite(result["psnr"]) and 0 < result["psnr"] < 26  # an untrained decoder is far off
    assert math.isfinite(result["lpips"]) and result["lpips"] > 0.05
    with pytest.raises(UserError):
        ev.evaluate_reconstruction(tmp_path / "vq", count=1, size=31)  # not a multiple of f=2
    with pytest.raises(UserError):
        ev.evaluate_label_following(tmp_path / "vq")  # no transformer: cannot generate


# --- label following -------------------------------------------------------------------------------------


def tiny_complete_checkpoint(path: Path, n_labels: int = 8) -> Path:
    torch.manual_seed(0)
    cond_ae = AutoencoderConfig(**{**TINY_AE, "in_channels": n_labels, "out_ch": n_labels, "n_embed": 16})
    config = ModelConfig(
        first_stage=AutoencoderConfig(**TINY_AE),
        condition=ConditionSpec(kind="segmentation", n_labels=n_labels, codebook_size=16,
                                label_names=LABELS[:n_labels], palette=PALETTE[:n_labels]),
        condition_autoencoder=cond_ae,
        transformer=GPTConfig(vocab_size=32, block_size=64, n_layer=1, n_head=2, n_embd=32),
        window=(4, 4),
    )
    save_checkpoint(path, config, TamingModel(config).state_dict())
    return path


class FakePipeline:
    """Generates the real render of a held-out label map (a perfect model), or flat grey (a useless one)."""

    def __init__(self, perfect: bool):
        self.perfect = perfect
        condition = ConditionSpec(kind="segmentation", n_labels=8, label_names=LABELS)
        self.spec = SimpleNamespace(downsample_factor=8, condition=condition)
        self.backend = SimpleNamespace(name="fake")

    def generate(self, labels, *, seed, top_k, mode, on_token=None):
        height, width = labels.shape
        for k in range(64):
            scene = render_scene(VALIDATION_SEED_BASE + k, height, width)
            if np.array_equal(scene.labels, labels):
                break
        else:
            raise AssertionError("not a held-out label map")
        image = scene.image if self.perfect else np.full((height, width, 3), 128, np.uint8)
        return SimpleNamespace(images=[Image.fromarray(image)], stats={"sample_seconds": 0.0, "decode_seconds": 0.0})


def test_label_following_of_a_perfect_and_a_useless_generator(segmenter):
    sizes = ((128, 128), (256, 128))
    perfect = ev.evaluate_label_following("fake", sizes, count=2, segmenter=segmenter, pipeline=FakePipeline(True))
    useless = ev.evaluate_label_following("fake", sizes, count=2, segmenter=segmenter, pipeline=FakePipeline(False))
    for good, bad in zip(perfect["sizes"], useless["sizes"]):
        assert good["generated"] == good["real"]  # the generated images are the real renders
        assert good["real"] == bad["real"]  # the ceiling does not depend on the model
        assert good["generated"]["miou"] > 0.6 > bad["generated"]["miou"]
    assert [r["size"] for r in perfect["sizes"]] == [[128, 128], [256, 128]]


def test_label_following_through_a_first_stage_scores_its_reconstructions(segmenter):
    """An identity first stage reaches the real renders' score; one that outputs grey falls far below it."""
    sizes = ((128, 128),)
    lossless = ev.evaluate_label_following("fake", sizes, count=2, segmenter=segmenter, pipeline=FakePipeline(False),
                                           reconstruct=lambda images: images)
    grey = ev.evaluate_label_following("fake", sizes, count=2, segmenter=segmenter, pipeline=FakePipeline(False),
                                       reconstruct=np.zeros_like)
    assert lossless["sizes"][0]["reconstructed"] == lossless["sizes"][0]["real"]
    assert grey["sizes"][0]["reconstructed"]["miou"] < 0.6 < grey["sizes"][0]["real"]["miou"]


def test_run_eval_on_a_tiny_random_complete_checkpoint(tmp_path, segmenter):
    model = tiny_complete_checkpoint(tmp_path / "model")
    assert ev.supported(model) == (True, True)
    lines = ev.run_eval(model, recon_count=2, recon_size=32, label_count=2, sizes="32x32,64x32", json_out=tmp_path / "eval.json",
                        save_dir=tmp_path / "images")
    results = json.loads((tmp_path / "eval.json").read_text())
    assert results["reconstruction"]["size"] == [32, 32] and math.isfinite(results["reconstruction"]["psnr"])
    rows = results["label_following"]["sizes"]
    assert [r["size"] for r in rows] == [[32, 32], [64, 32]] and results["label_following"]["backend"] == "torch"
    for row in rows:
        for key in ("generated", "real", "reconstructed"):  # the checkpoint has a first stage: its ceiling too
            assert 0 <= row[key]["pixel_accuracy"] <= 1 and row[key]["pixels"] == 2 * row["size"][0] * row["size"][1]
    assert len(list((tmp_path / "images").glob("*.png"))) == 4
    assert any("PSNR" in line for line in lines) and any(line.strip().startswith("64x32") for line in lines)
    again = ev.evaluate_label_following(model, ((32, 32),), count=2, segmenter=segmenter)
    assert again["sizes"][0]["generated"] == rows[0]["generated"]  # same seeds, same images


class RecordingBars:
    """A progress-bar factory that keeps every bar's description and updates."""

    def __init__(self):
        self.updates: dict[str, list[tuple[int, int]]] = {}

    @contextlib.contextmanager
    def __call__(self, description, unit):
        self.updates[description] = []
        yield lambda done, total, info="": self.updates[description].append((done, total))


def test_run_eval_reports_each_part_as_it_finishes(tmp_path):
    """Each part's lines reach ``echo`` (and the JSON file) before the next part starts; one bar per part."""
    model = tiny_complete_checkpoint(tmp_path / "model")
    json_path = tmp_path / "eval.json"
    seen_on_disk = {}

    def echo(line):
        if line.startswith("label following") or line.strip().startswith("64x32"):
            seen_on_disk[line.split()[0]] = json.loads(json_path.read_text())  # written after the previous part

    bars = RecordingBars()
    lines = ev.run_eval(model, recon_count=3, recon_size=32, label_count=2, sizes="32x32,64x32", json_out=json_path,
                        bar=bars, echo=echo)
    before_labels, before_second_size = seen_on_disk["label"], seen_on_disk["64x32"]
    assert "reconstruction" in before_labels and "label_following" not in before_labels
    assert [row["size"] for row in before_second_size["label_following"]["sizes"]] == [[32, 32]]
    final = json.loads(json_path.read_text())
    assert [row["size"] for row in final["label_following"]["sizes"]] == [[32, 32], [64, 32]]
    assert lines == ev.format_table(final) + [f"results written to {json_path}"]
    assert list(bars.updates) == ["reconstruction 32x32", "label following 32x32", "label following 64x32"]
    assert bars.updates["reconstruction 32x32"][-1] == (3, 3)
    tokens_per_map = (32 // 2) * (64 // 2)  # tiny model: f=2
    assert bars.updates["label following 64x32"][-1] == (2 * tokens_per_map, 2 * tokens_per_map)
    done = [d for d, _ in bars.updates["label following 64x32"]]
    assert done == sorted(done) and len(set(done)) > 2  # per transformer call, never backwards


def test_eval_cli_quick_preset_and_explicit_options(tmp_path):
    from typer.testing import CliRunner

    from taming_deploy.cli import app

    model = tiny_complete_checkpoint(tmp_path / "model")
    result = CliRunner().invoke(app, ["eval", "--quick", "--model", str(model), "--count", "1", "--size", "32",
                                      "--sizes", "32x32", "--json", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    written = json.loads((tmp_path / "eval.json").read_text())
    assert written["reconstruction"]["count"] == 1  # given explicitly
    assert written["label_following"]["sizes"][0]["count"] == ev.QUICK["label_count"]  # from --quick
    assert "PSNR" in result.stdout


def test_eval_refuses_bad_input(tmp_path):
    with pytest.raises(UserError):
        ev.run_eval(tmp_path / "missing")
    seven = tiny_complete_checkpoint(tmp_path / "seven", n_labels=7)
    with pytest.raises(UserError, match="segmenter"):
        ev.evaluate_label_following(seven, ((32, 32),), count=1)
    with pytest.raises(UserError, match="segmenter"):
        ev.run_eval(seven, what="labels")
    lines = ev.run_eval(seven, recon_count=1, recon_size=32)  # "all": what it can, and says what it skipped
    assert any("PSNR" in line for line in lines) and any(line.startswith("note: label following") for line in lines)
    model = tiny_complete_checkpoint(tmp_path / "model")
    for kwargs in ({"what": "everything"}, {"sizes": "32by32"}, {"label_count": 0}, {"what": "labels", "sizes": "33x32"},
                   {"what": "labels", "mode": "slow"}):
        with pytest.raises(UserError):
            ev.run_eval(model, **kwargs)
    config = ModelConfig(first_stage=AutoencoderConfig(**TINY_AE))
    save_checkpoint(tmp_path / "vq", config, TamingModel(config).state_dict())
    with pytest.raises(UserError):
        ev.run_eval(tmp_path / "vq", what="labels")

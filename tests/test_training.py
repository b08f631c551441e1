"""Training: each stage's step learns, DDP keeps ranks identical, a killed run resumes exactly."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from training_fixtures import tiny_config, write_yaml
from taming_deploy.errors import UserError
from taming_deploy.training.checkpoint import load_model, replace_decoder, save_checkpoint
from taming_deploy.training.config import ModelConfig
from taming_deploy.training.data.sources import SyntheticLandscapes
from taming_deploy.training.distributed import DistEnv
from taming_deploy.training.losses.vqgan_loss import adaptive_weight
from taming_deploy.training.metrics import read_metrics
from taming_deploy.training.models.net2net import TamingModel
from taming_deploy.training.models.vqgan import AutoencoderConfig
from taming_deploy.training.stages.common import learning_rate
from taming_deploy.training.stages.cond import ConditionStage
from taming_deploy.training.stages.transformer import TransformerStage, tile_windows
from taming_deploy.training.stages.vqgan import VQGANStage
from taming_deploy.training.train_config import load_train_config

CPU = DistEnv(rank=0, world_size=1, device=torch.device("cpu"))
REPO = Path(__file__).resolve().parents[1]


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before: dict[str, torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in module.state_dict().items() if v.is_floating_point())


def test_vqgan_step_changes_weights_and_lowers_loss_on_a_repeated_batch():
    """Before disc_start the objective is L1 + LPIPS + codebook loss; one step must lower it."""
    torch.manual_seed(0)
    stage = VQGANStage(tiny_config("vqgan", lr=1e-3), CPU, SyntheticLandscapes())
    stage.loss.config.disc_start = 1000
    batch = stage.sample_batch(np.random.default_rng(0))
    x = torch.from_numpy(batch.images)

    def loss() -> float:
        with torch.no_grad():
            rec, latent = stage.vq(x)
            total, _ = stage.loss.generator_loss(latent.codebook_loss, x, rec, 0, stage.vq.decoder.conv_out.weight)
            return float(total)

    before, weights, disc = loss(), snapshot(stage.vq), snapshot(stage.discriminator)
    stage.train_step([batch], 0)
    assert changed(weights, stage.vq)
    assert not changed(disc, stage.discriminator)  # disc_factor is 0 before disc_start: D does not train
    assert loss() < before


def test_discriminator_step_after_disc_start_lowers_its_hinge_loss():
    torch.manual_seed(0)
    stage = VQGANStage(tiny_config("vqgan", lr=1e-3), CPU, SyntheticLandscapes())
    batch = stage.sample_batch(np.random.default_rng(0))
    x = torch.from_numpy(batch.images)
    with torch.no_grad():
        rec, _ = stage.vq(x)

    def d_loss() -> float:
        with torch.no_grad():
            return float(stage.loss.discriminator_loss(x, rec, global_step=0)[0])

    before, disc = d_loss(), snapshot(stage.discriminator)
    stage.train_step([batch], 0)
    assert changed(disc, stage.discriminator)
    stage.discriminator.eval()  # compare with fixed BatchNorm statistics on both sides
    after = d_loss()
    stage.discriminator.load_state_dict(disc)
    assert after < d_loss() or after < before


def tiny_vqgan_checkpoint(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    config = ModelConfig(first_stage=AutoencoderConfig.from_dict(tiny_config("vqgan").model))
    save_checkpoint(path, config, TamingModel(config).state_dict())
    return path


def decoder_finetune(checkpoint: Path) -> VQGANStage:
    cfg = tiny_config("vqgan", lr=1e-3)
    cfg.model, cfg.finetune_decoder = {}, checkpoint
    cfg.loss["disc_start"] = 1000
    return VQGANStage(cfg, CPU, SyntheticLandscapes())


def test_decoder_finetune_trains_only_the_decoder_and_keeps_every_token(tmp_path):
    stage = decoder_finetune(tiny_vqgan_checkpoint(tmp_path / "vq", seed=0))
    batch = stage.sample_batch(np.random.default_rng(0))
    x = torch.from_numpy(batch.images)

    def tokens_and_loss() -> tuple[torch.Tensor, float]:
        with torch.no_grad():
            rec, latent = stage.vq(x)
            total, _ = stage.loss.generator_loss(latent.codebook_loss, x, rec, 0, stage.vq.decoder.conv_out.weight)
            return latent.indices, float(total)

    (tokens, before), encoder, decoder = tokens_and_loss(), snapshot(stage.vq.encoder), snapshot(stage.vq.decoder)
    codebook = stage.vq.quantize.embedding.weight.detach().clone()
    for step in range(3):
        stage.train_step([batch], step)
    tokens_after, after = tokens_and_loss()
    assert changed(decoder, stage.vq.decoder) and after < before
    assert not changed(encoder, stage.vq.encoder) and torch.equal(codebook, stage.vq.quantize.embedding.weight)
    assert torch.equal(tokens, tokens_after)
    lr = stage.optimizers["autoencoder"].param_groups[0]["lr"]
    assert lr == pytest.approx(learning_rate(2, 1e-3, stage.cfg.train.warmup_steps, stage.cfg.train.steps))


def test_export_takes_a_finetuned_decoder_only_from_the_same_first_stage(tmp_path):
    original = tiny_vqgan_checkpoint(tmp_path / "vq", seed=0)
    stage = decoder_finetune(original)
    stage.train_step([stage.sample_batch(np.random.default_rng(0))], 0)
    save_checkpoint(tmp_path / "tuned", stage.config, stage.model.state_dict())
    model = load_model(original)
    replace_decoder(model, load_model(tmp_path / "tuned"), tmp_path / "tuned")
    indices = torch.randint(0, stage.config.first_stage.n_embed, (1, 4, 4))
    with torch.no_grad():
        torch.testing.assert_close(model.first_stage_model.decode_indices(indices), stage.vq.decode_indices(indices), rtol=0, atol=0)
    with pytest.raises(UserError, match="not a decoder fine-tune"):
        replace_decoder(model, load_model(tiny_vqgan_checkpoint(tmp_path / "other", seed=1)), tmp_path / "other")


def test_decoder_finetune_config_takes_its_model_from_the_checkpoint(tmp_path):
    doc = {"stage": "vqgan", "finetune_decoder": str(tmp_path / "vq"), "train": {"steps": 5}}
    cfg = load_train_config(write_doc(doc, tmp_path / "ft.yaml"), "vqgan")
    assert cfg.finetune_decoder == tmp_path / "vq" and cfg.model == {}
    with pytest.raises(UserError, match="remove the model section"):
        load_train_config(write_doc({**doc, "model": tiny_config("vqgan").model}, tmp_path / "both.yaml"), "vqgan")
    with pytest.raises(UserError, match="no model section"):
        load_train_config(write_doc({"stage": "vqgan", "train": {"steps": 5}}, tmp_path / "none.yaml"), "vqgan")
    with pytest.raises(UserError, match="finetune_decoder not used by a cond config"):
        load_train_config(write_doc({**doc, "stage": "cond", "model": tiny_config("cond").model}, tmp_path / "cond.yaml"), "cond")
    with pytest.raises(UserError, match="modle not used by a vqgan config"):
        load_train_config(write_doc({"stage": "vqgan", "modle": tiny_config("vqgan").model}, tmp_path / "typo.yaml"), "vqgan")


def write_doc(doc: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(doc))
    return path


def test_condition_step_changes_weights_and_lowers_loss_on_a_repeated_batch():
    torch.manual_seed(0)
    stage = ConditionStage(tiny_config("cond", lr=2e-3), CPU, SyntheticLandscapes())
    labels = stage.sample_batch(np.random.default_rng(0))
    one_hot = stage.vq.one_hot(torch.from_numpy(labels))

    def loss() -> float:
        with torch.no_grad():
            logits, _ = stage.vq(one_hot)
            return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, one_hot))

    before, weights = loss(), snapshot(stage.vq)
    stage.train_step([labels], 0)
    assert changed(weights, stage.vq)
    assert loss() < before


def tiny_first_stages(tmp_path: Path) -> tuple[Path, Path]:
    torch.manual_seed(0)
    vq_cfg = tiny_config("vqgan")
    first = ModelConfig(first_stage=AutoencoderConfig.from_dict(vq_cfg.model))
    save_checkpoint(tmp_path / "vq", first, TamingModel(first).state_dict())
    cond_stage = ConditionStage(tiny_config("cond"), CPU, SyntheticLandscapes())
    save_checkpoint(tmp_path / "cond", cond_stage.config, cond_stage.model.state_dict())
    return tmp_path / "vq", tmp_path / "cond"


def test_transformer_step_changes_only_the_transformer_and_lowers_loss(tmp_path):
    vq, cond = tiny_first_stages(tmp_path)
    cfg = tiny_config("transformer", lr=3e-3)
    cfg.first_stage, cfg.cond_stage = vq, cond
    stage = TransformerStage(cfg, CPU, SyntheticLandscapes(), tmp_path / "run")
    cond_tokens, image_tokens = (torch.from_numpy(a) for a in stage.sample_batch(np.random.default_rng(0)))

    def loss_on(cond: torch.Tensor, image: torch.Tensor) -> float:
        with torch.no_grad():
            return float(stage.model.loss(cond, image))

    def loss() -> float:
        return loss_on(cond_tokens, image_tokens)

    before, gpt, frozen = loss(), snapshot(stage.model.transformer), snapshot(stage.model.first_stage_model)
    for step in range(3):
        stage.train_step([(cond_tokens.numpy(), image_tokens.numpy())], step)
    assert changed(gpt, stage.model.transformer)
    assert not changed(frozen, stage.model.first_stage_model)
    assert loss() < before
    decay = stage.optimizers["transformer"].param_groups
    assert decay[0]["weight_decay"] == 0.01 and decay[1]["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay[0]["params"])  # Linear weights only
    assert any(p is stage.model.transformer.pos_emb for p in decay[1]["params"])

    scores, pictures = stage.evaluate(3)  # validation scores every window of the held-out maps
    windows = [torch.from_numpy(tile_windows(m, cfg.window)) for m in (stage.validation_maps.condition, stage.validation_maps.image)]
    assert len(windows[0]) > len(stage.validation_maps.image)
    assert scores["val/loss"] == pytest.approx(loss_on(*windows), rel=1e-5)
    assert pictures["val/labels_samples"].ndim == 3


@pytest.mark.parametrize("shape, window, tiles", [((32, 32), (16, 16), 4), ((20, 24), (16, 16), 4),
                                                  ((8, 40), (16, 16), 3)])
def test_validation_windows_are_crops_that_cover_every_position(shape, window, tiles):
    maps = np.arange(2 * shape[0] * shape[1]).reshape(2, *shape)
    windows = tile_windows(maps, window)
    wh, ww = min(window[0], shape[0]), min(window[1], shape[1])
    assert windows.shape == (2 * tiles, wh * ww)
    assert set(windows.ravel()) == set(maps.ravel())
    for flat in windows:  # each row is one contiguous crop of one map, in raster order
        n, top, left = np.unravel_index(flat[0], maps.shape)
        assert np.array_equal(flat, maps[n, top : top + wh, left : left + ww].ravel())


def test_adaptive_weight_matches_its_formula_on_a_tiny_decoder():
    torch.manual_seed(0)
    first, last = torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Conv2d(4, 3, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    rec = last(torch.relu(first(x)))
    nll = torch.mean(torch.abs(x - rec))
    g_loss = -torch.mean(rec**3)
    got = adaptive_weight(nll, g_loss, last.weight, disc_weight=0.8)
    grad_nll = torch.autograd.grad(nll, last.weight, retain_graph=True)[0]
    grad_g = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
    expected = torch.clamp(grad_nll.norm() / (grad_g.norm() + 1e-4), 0, 1e4) * 0.8
    torch.testing.assert_close(got, expected)
    assert not got.requires_grad


@pytest.mark.slow
def test_two_process_gloo_ddp_keeps_weights_identical_across_ranks(tmp_path):
    out = tmp_path / "ranks.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         str(REPO / "tests" / "ddp_worker.py"), str(out)],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rank0, rank1 = json.loads(out.read_text())
    for stage in ("vqgan", "cond"):
        assert rank0[stage]["weights"] == rank1[stage]["weights"]
    assert rank0["vqgan"]["extra"] == rank1["vqgan"]["extra"]  # the discriminator, synchronised by hand


def train_cli(config: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "taming_deploy.cli", "train", "cond", "--config", str(config), "--out", str(out),
            "--steps", str(steps), *extra]


def saved_step(run: Path) -> int:
    path = run / "last" / "trainer.json"
    return json.loads(path.read_text())["step"] if path.exists() else 0


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    config = write_yaml(tiny_config("cond"), tmp_path / "tiny.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = tmp_path / "killed"
    proc = subprocess.Popen(train_cli(config, run, 10_000), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while saved_step(run) < 6 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = saved_step(run)
    assert killed_at >= 6
    target = killed_at + 4
    resumed = subprocess.run(train_cli(config, run, target, "--resume"), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming {run} at step {killed_at}" in resumed.stdout
    steps = [row["step"] for row in read_metrics(run) if "train/total_loss" in row]
    assert steps == list(range(1, target + 1))  # the curve continues: no gap, no repeated stretch
    assert not [p.name for p in run.iterdir() if p.name.startswith((".tmp-", ".old-"))]  # the kill's leftovers removed
    straight = tmp_path / "straight"
    done = subprocess.run(train_cli(config, straight, target), env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    a, b = load_file(str(run / "final" / "model.safetensors")), load_file(str(straight / "final" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_dead_codes_are_moved_onto_encoder_outputs_and_their_adam_moments_cleared():
    from taming_deploy.training.models.quantizer import VectorQuantizer
    from taming_deploy.training.stages.codebook import CodebookRestarter

    torch.manual_seed(0)
    quantizer = VectorQuantizer(n_embed=8, embed_dim=4)
    with torch.no_grad():
        quantizer.embedding.weight[4:] = 100.0  # codes 4..7 are far from every latent: dead
    optimizer = torch.optim.Adam(quantizer.parameters(), lr=1e-3)
    restarter = CodebookRestarter(quantizer, optimizer, every=2, until=100, env=CPU)
    latent = torch.randn(2, 4, 3, 3)
    used_before = len(quantizer(latent).indices.unique())
    for step in range(2):
        out = quantizer(latent)
        out.codebook_loss.backward()
        optimizer.step()
        restarter.observe(out.indices, out.latent)
        restarted = restarter.maybe_restart(step)
    assert restarted == 4
    moved = quantizer.embedding.weight[4:].detach()
    targets = latent.permute(0, 2, 3, 1).reshape(-1, 4)
    assert torch.cdist(moved, targets).min(dim=1).values.max() < 0.1  # each sits on an encoder output
    assert torch.all(optimizer.state[quantizer.embedding.weight]["exp_avg"][4:] == 0)
    assert restarter.usage.sum() == 0
    assert len(quantizer(latent).indices.unique()) > used_before  # the moved codes are now picked

"""Hostile documents: malformed manifests, configs, YAML, engines.json, trainer.json and safetensors
headers, and bundles that point outside themselves. Each is one line naming the file and the field (see
tests/hostile.py for what every case asserts)."""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from hostile import Case, copy_of, edit_json, edit_text, run_case, then, write

BUNDLE = then(copy_of("bundle", "b"))
CHECKPOINT = then(copy_of("checkpoint", "ck"))
INFO = "info {tmp}/b"
RUN_BUNDLE = "generate --model {tmp}/b --backend ort --cond {labels} --greedy --out {tmp}/o.png"
RUN_CHECKPOINT = "generate --model {tmp}/ck --backend torch --cond {labels} --greedy --out {tmp}/o.png"
IMPORT = "import-taming {ckpt} --config {tmp}/p.yaml --out {tmp}/out"
ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(  # 10^8 values from 8 lines
    f"{chr(98 + k)}: &{chr(98 + k)} [{', '.join([f'*{chr(97 + k)}'] * 10)}]\n" for k in range(7))


def manifest(dotted: str, value: object) -> object:
    return then(BUNDLE, edit_json("b/manifest.json", dotted, value))


def config(dotted: str, value: object) -> object:
    return then(CHECKPOINT, edit_json("ck/config.json", dotted, value))


def safetensors(header: bytes, length: int | None = None):
    """A model.safetensors whose header is ``header`` (its declared length ``length``)."""
    return then(CHECKPOINT, write("ck/model.safetensors", struct.pack("<Q", len(header) if length is None else length) + header))


def symlinked_graph(tmp: Path, names: dict) -> None:
    BUNDLE(tmp, names)
    os.replace(tmp / "b" / "decoder.onnx", tmp / "outside.onnx")
    os.symlink(tmp / "outside.onnx", tmp / "b" / "decoder.onnx")


def yaml_with(transform) -> object:
    def setup(tmp: Path, names: dict) -> None:
        (tmp / "p.yaml").write_text(transform(names["yaml"].read_text()))
    return setup


CASES = [
    # manifest.json
    Case("manifest-not-json", INFO, ("manifest.json", "not valid JSON"), then(BUNDLE, write("b/manifest.json", "{"))),
    Case("manifest-not-utf8", INFO, ("manifest.json", "not UTF-8"), then(BUNDLE, write("b/manifest.json", b'{"a": "\xff"}'))),
    Case("manifest-a-list", INFO, ("manifest.json", "expected a mapping"), then(BUNDLE, write("b/manifest.json", "[1, 2]"))),
    Case("manifest-too-large", INFO, ("manifest.json", "too large"), then(BUNDLE, write("b/manifest.json", " " * (17 << 20)))),
    Case("manifest-huge-format-string", INFO, ("not a taming-deploy bundle",), manifest("format", "x" * 5_000_000)),
    Case("manifest-version-as-string", INFO, ("format_version", "'2'"), manifest("format_version", "2")),
    Case("manifest-block-size-absurd", INFO, ("model.block_size", "1000000000000"), manifest("model.block_size", 10**12)),
    Case("manifest-n-head-zero", INFO, ("model.n_head",), manifest("model.n_head", 0)),
    Case("manifest-downsample-negative", INFO, ("model.downsample_factor",), manifest("model.downsample_factor", -8)),
    Case("manifest-window-zero", INFO, ("model.window[0]",), manifest("model.window.0", 0)),
    Case("manifest-n-layer-disagrees-with-graph", INFO, ("transformer", "past_key"), manifest("model.n_layer", 3)),
    Case("manifest-model-missing", INFO, ("model", "missing"), manifest("model", "-")),
    Case("manifest-condition-kind-unknown", INFO, ("model.condition.kind",), manifest("model.condition.kind", "audio")),
    Case("manifest-palette-colour-short", INFO, ("model.condition.palette[0]",), manifest("model.condition.palette", [[1, 2]] * 7)),
    Case("manifest-graphs-a-list", INFO, ("graphs", "expected a mapping"), manifest("graphs", [])),
    Case("manifest-graph-unknown", INFO, ("graphs.",), manifest("graphs.vocoder", {})),
    Case("manifest-sha-not-hex", INFO, ("sha256",), manifest("graphs.encoder.fp32.sha256", "z" * 64)),
    Case("manifest-shape-negative", INFO, ("shape[0]",), manifest("graphs.encoder.fp32.inputs.0.shape", [-1, 3, 4, 4])),
    Case("manifest-duplicate-key", INFO, ("manifest.json", "'format_version' appears more than once"),
         then(BUNDLE, edit_text("b/manifest.json", '"format_version": 2', '"format_version": 2, "format_version": 2'))),
    Case("manifest-nested-100000-deep", INFO, ("manifest.json", "not valid JSON"), then(BUNDLE, write("b/manifest.json", "[" * 100_000))),
    Case("manifest-n-embd-nan", INFO, ("model.n_embd", "nan"), manifest("model.n_embd", float("nan"))),
    Case("manifest-window-infinity", INFO, ("model.window[0]", "inf"), manifest("model.window.0", float("inf"))),
    Case("info-json-engines-json-not-json", "info --json {tmp}/b", ("engines.json", "not valid JSON"),
         then(BUNDLE, write("b/engines/engines.json", "{"))),  # was a JSONDecodeError traceback
    # bundle confinement
    Case("graph-path-dotdot", RUN_BUNDLE, ("../x.onnx", "relative path"), manifest("graphs.decoder.fp32.file", "../x.onnx")),
    Case("graph-path-absolute", RUN_BUNDLE, ("/etc/passwd", "relative path"), manifest("graphs.decoder.fp32.file", "/etc/passwd")),
    Case("graph-symlink-out", RUN_BUNDLE, ("decoder.onnx", "points outside"), symlinked_graph),
    Case("verify-symlink-out", "verify {tmp}/b", ("points outside",), symlinked_graph),
    # engines/engines.json
    Case("engines-json-a-list", "verify {tmp}/b", ("engines.json", "expected a mapping"), then(BUNDLE, write("b/engines/engines.json", "[]"))),
    Case("engines-json-not-json", "verify {tmp}/b", ("engines.json", "not valid JSON"), then(BUNDLE, write("b/engines/engines.json", "{"))),
    # config.json of a checkpoint
    Case("config-block-size-absurd", RUN_CHECKPOINT, ("config.json", "transformer.block_size"), config("transformer.block_size", 10**12)),
    Case("config-stage-a-list", RUN_CHECKPOINT, ("config.json", "first_stage", "mapping"), config("first_stage", [1])),
    Case("config-ch-mult-strings", RUN_CHECKPOINT, ("first_stage.ch_mult[0]",), config("first_stage.ch_mult", ["1"])),
    Case("config-n-layer-disagrees-with-weights", RUN_CHECKPOINT, ("does not match its config",), config("transformer.n_layer", 3)),
    Case("config-not-json", RUN_CHECKPOINT, ("config.json", "not valid JSON"), then(CHECKPOINT, write("ck/config.json", "nope"))),
    Case("info-json-config-not-json", "info --json {tmp}/ck", ("config.json", "not valid JSON"),
         then(CHECKPOINT, write("ck/config.json", "nope"))),
    Case("config-duplicate-key", RUN_CHECKPOINT, ("config.json", "appears more than once"),
         then(CHECKPOINT, edit_text("ck/config.json", "{", '{"format": 1, ', count=1))),
    Case("config-pkeep-nan", RUN_CHECKPOINT, ("pkeep",), then(CHECKPOINT, write("ck/config.json", '{"format": "taming-deploy-checkpoint", "pkeep": NaN}'))),
    # safetensors headers
    Case("safetensors-header-2-62", RUN_CHECKPOINT, ("model.safetensors", "header length"), safetensors(b"{}", 1 << 62)),
    Case("safetensors-header-not-utf8", RUN_CHECKPOINT, ("not UTF-8",), safetensors(b'{"\xff": 1}')),
    Case("safetensors-header-a-list", RUN_CHECKPOINT, ("expected a mapping",), safetensors(b"[1]")),
    Case("safetensors-shape-negative", "info {tmp}/ck", ("shape[0]",), safetensors(b'{"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}')),
    Case("safetensors-offsets-past-end", "info {tmp}/ck", ("data_offsets",), safetensors(b'{"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}')),
    # project.yaml
    Case("yaml-alias-bomb", IMPORT, ("p.yaml", "aliases expand"), write("p.yaml", ALIAS_BOMB)),
    Case("yaml-self-reference", IMPORT, ("p.yaml", "refers to itself"), write("p.yaml", "model: &m\n  target: x\n  self: *m\n")),
    Case("yaml-a-list", IMPORT, ("p.yaml", "expected a mapping"), write("p.yaml", "- 1\n- 2\n")),
    Case("yaml-not-utf8", IMPORT, ("p.yaml", "not UTF-8"), write("p.yaml", b"model: \xff\n")),
    Case("yaml-block-size-absurd", IMPORT, ("block_size",), yaml_with(lambda t: t.replace("block_size: ", "block_size: 1000000000000 #"))),
    Case("yaml-params-a-string", IMPORT, ("p.yaml",), yaml_with(lambda t: t.replace("transformer_config:", "transformer_config: oops\n  unused:"))),
]


@pytest.fixture
def names(imported_checkpoint, fixture_bundle, label_png, reference_dir):
    return {"checkpoint": imported_checkpoint, "bundle": fixture_bundle, "labels": label_png,
            "ckpt": reference_dir / "last.ckpt", "yaml": reference_dir / "project.yaml"}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_document(case, tmp_path, names):
    run_case(case, tmp_path, names)


@pytest.mark.parametrize("trainer", ["[]", '{"step": "7", "optimizers": {}}', '{"step": 7, "optimizers": []}', "{"])
def test_malformed_trainer_json_is_one_user_error(tmp_path, trainer):
    from taming_deploy.errors import UserError
    from taming_deploy.training.train_state import load_train_state

    (tmp_path / "trainer.json").write_text(trainer)
    with pytest.raises(UserError, match="trainer.json") as info:
        load_train_state(tmp_path, {"opt": object()})  # type: ignore[dict-item]
    assert "\n" not in str(info.value)


def test_verify_names_every_changed_file_including_fp16_graphs(tmp_path, names):
    from helpers import run_cli

    BUNDLE(tmp_path, names)
    assert run_cli("verify", str(tmp_path / "b")).returncode == 0
    for name in ("transformer.fp16.onnx", "decoder.onnx"):
        with open(tmp_path / "b" / name, "r+b") as f:
            f.seek(100)
            f.write(b"tampered")
    (tmp_path / "b" / "encoder.fp16.onnx").unlink()
    proc = run_cli("verify", str(tmp_path / "b"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 3, proc.stderr
    assert sum("transformer.fp16.onnx does not match" in line for line in lines) == 1
    assert sum("decoder.onnx does not match" in line for line in lines) == 1
    assert sum("encoder.fp16.onnx is listed in the manifest but missing" in line for line in lines) == 1
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert "fp16" in manifest["graphs"]["transformer"]

"""Hostile arguments and resource requests, through the CLI and the Python API (one validation serves both):
each is refused with one line before anything is allocated. CLI cases: see tests/hostile.py."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hostile import Case, run_case
from taming_deploy.errors import UserError

GENERATE = "generate --model {checkpoint} --backend torch --cond {labels} --out {tmp}/o.png "


def png_header_only(width: int, height: int):
    """A PNG that declares width x height (8-bit grey) but holds no pixel data: what a decompression bomb
    looks like before decoding, in a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)) + chunk(b"IEND", b"")

    def setup(tmp: Path, names: dict) -> None:
        (tmp / "bomb.png").write_bytes(data)
    return setup


def animated_png(tmp: Path, names: dict) -> None:
    frames = [Image.open(names["labels"]).convert("L"), Image.open(names["labels"]).convert("L").rotate(90)]
    frames[0].save(tmp / "anim.png", save_all=True, append_images=frames[1:])


BOMB = GENERATE.replace("{labels}", "{tmp}/bomb.png")
CASES = [
    Case("temperature-nan", GENERATE + "--temperature nan", ("temperature", "finite")),
    Case("temperature-inf", GENERATE + "--temperature inf", ("temperature",)),
    Case("temperature-zero", GENERATE + "--temperature 0", ("temperature",)),
    Case("seed-negative", GENERATE + "--seed -1", ("seed", "0..")),
    Case("seed-beyond-int64", GENERATE + "--seed 18446744073709551616", ("seed",)),
    Case("top-k-negative", GENERATE + "--top-k -5", ("top-k",)),
    Case("top-p-zero", GENERATE + "--top-p 0", ("top-p", "(0, 1]")),
    Case("top-p-above-one", GENERATE + "--top-p 1.5", ("top-p",)),
    Case("top-p-nan", GENERATE + "--top-p nan", ("top-p",)),
    Case("mode-unknown", GENERATE + "--mode slow", ("mode", "exact or fast")),
    Case("window-stride-zero", GENERATE + "--mode fast --window-stride 0", ("window stride",)),
    Case("n-zero", GENERATE + "-n 0", ("n must be",)),
    Case("n-ten-thousand", GENERATE + "-n 10000", ("10000 image(s)", "GiB", "limit", "--max-pixels")),
    Case("size-huge", GENERATE + "--size 100000x100000", ("100000x100000", "GiB", "--max-pixels")),
    Case("size-zero", GENERATE + "--size 0x0", ("--size",)),
    Case("max-pixels-zero", GENERATE + "--max-pixels 0", ("max-pixels",)),
    Case("condition-beyond-max-pixels", BOMB, ("bomb.png", "5000x5000", "limit of 4,194,304"), png_header_only(5000, 5000)),
    Case("condition-30000-squared", BOMB, ("bomb.png", "900000000 pixels", "limit is 4,194,304"), png_header_only(30000, 30000)),
    Case("condition-bomb-past-pillow-limit", BOMB + "--max-pixels 1000000000000", ("bomb.png", "900000000 pixels"),
         png_header_only(30000, 30000)),
    Case("condition-empty-png", BOMB, ("bomb.png",), png_header_only(0, 0)),
    Case("condition-is-a-directory", GENERATE.replace("{labels}", "{tmp}"), ("a directory", "image file")),
    Case("condition-is-a-device", GENERATE.replace("{labels}", "/dev/zero"), ("/dev/zero", "not a regular file")),
    Case("condition-missing", GENERATE.replace("{labels}", "{tmp}/nothing.png"), ("nothing.png", "no such file")),
    # Pillow warned (on stderr, before our line) past 89M pixels and refused past 179M
    Case("condition-in-pillow-warning-range", BOMB, ("bomb.png", "10000x10000"), png_header_only(10000, 10000)),
    Case("condition-animated", GENERATE.replace("{labels}", "{tmp}/anim.png"), ("anim.png", "animated", "2 frames"), animated_png),
    Case("condition-name-with-newline", GENERATE.replace("{labels}", "'{tmp}/no\nfile.png'"), ("no\\nfile.png", "no such file")),
    Case("eval-backend-unknown", "eval --quick --backend xyz", ("--backend", "'xyz'")),  # was an AssertionError
    Case("serve-timeout-nan", "serve --timeout-s nan", ("--timeout-s",)),  # nan passed every comparison
    Case("serve-batch-wait-infinite", "serve --batch-wait-ms inf", ("--batch-wait-ms", "finite")),
    Case("serve-cpus-infinite", "serve --cpus-per-replica inf", ("--cpus-per-replica",)),  # was Ray's OverflowError
    Case("serve-host-with-newline", "serve --host '127.0.0.1\nx'", ("--host", "not an address")),  # was Ray's RuntimeError
    Case("serve-host-not-here", "serve --host 192.0.2.1", ("cannot listen on 192.0.2.1:8000",)),
    Case("size-arabic-indic-digits", GENERATE + "--size \u0665\u0661\u0662x64", ("--size must look like",)),  # int() read them
    Case("eval-sizes-trailing-comma", "eval --quick --sizes 256x256,", ("--sizes must look like", "''")),
    Case("eval-sizes-full-width", "eval --quick --sizes \uff12\uff15\uff16x256", ("--sizes must look like",)),
    Case("build-max-size-zero", "build --max-size 0x5", ("--max-size must be positive",)),  # said --size
    Case("out-name-with-newline", GENERATE + "--out '{tmp}/a\nb.png'", ("a\\nb.png", "control character")),
]


@pytest.fixture
def names(imported_checkpoint, label_png):
    return {"checkpoint": imported_checkpoint, "labels": label_png}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_cli_argument(case, tmp_path, names):
    run_case(case, tmp_path, names)


@pytest.fixture(scope="module")
def pipeline(imported_checkpoint):
    from taming_deploy.pipeline import Pipeline

    return Pipeline.load(imported_checkpoint, "torch")


API_CASES = [
    ("empty-array", dict(cond=np.zeros((0, 0), np.uint8)), "empty"),
    ("wrapping-label-ids", dict(cond=np.full((16, 16), 2**32 + 3, np.int64)), "out of range"),
    ("negative-label-ids", dict(cond=np.full((16, 16), -1, np.int64)), "out of range"),
    ("nan-depth-array", dict(cond=np.full((16, 16), np.nan, np.float32)), "NaN"),
    ("3-d-array", dict(cond=np.zeros((2, 16, 16), np.uint8)), "2-D"),
    ("float-condition", dict(cond=3.5), "a condition is"),
    ("bool-condition", dict(cond=True), "a condition is"),
    ("size-zero", dict(size=(0, 0)), "size"),
    ("size-one-number", dict(size=(64,)), "size"),
    ("mode-unknown", dict(mode="slow"), "mode"),
    ("temperature-nan", dict(temperature=float("nan")), "temperature"),
    ("temperature-string", dict(temperature="1"), "temperature"),
    ("seed-negative", dict(seed=-1), "seed"),
    ("seed-float", dict(seed=1.5), "seed"),
    ("top-k-zero", dict(top_k=0), "top-k"),
    ("top-p-negative", dict(top_p=-0.1), "top-p"),
    ("n-bool", dict(n=True), "n must be"),
    ("n-huge", dict(n=10_000), "GiB"),
    ("max-pixels-negative", dict(max_pixels=-1), "max-pixels"),
    ("empty-path", dict(cond=""), "path is empty"),  # was '.: a directory'
    ("path-with-newline", dict(cond="no\nfile.png"), "no\\nfile.png: no such file"),
    ("on-token-not-callable", dict(on_token=5), "on_token must be a function"),  # was a TypeError mid-sampling
    ("window-stride-huge", dict(mode="fast", window_stride=10**30), "window stride"),
    ("seed-numpy-uint64-beyond-int64", dict(seed=np.uint64(2**64 - 1)), "seed must be an integer in 0.."),
    ("label-image-la", dict(cond=Image.new("LA", (16, 16))), "mode LA"),
    ("label-image-cmyk", dict(cond=Image.new("CMYK", (16, 16))), "mode CMYK"),
    ("label-image-1-bit", dict(cond=Image.new("1", (16, 16))), "mode 1"),
    ("label-image-empty", dict(cond=Image.new("L", (0, 0))), "empty"),
    ("label-array-bool", dict(cond=np.zeros((16, 16), bool)), "dtype bool"),
    ("label-array-object", dict(cond=np.zeros((16, 16), object)), "dtype object"),
]


@pytest.mark.parametrize("kwargs,needle", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_hostile_api_argument(pipeline, expected, kwargs, needle):
    kwargs = {"cond": expected["labels"].astype(np.uint8), **kwargs}
    with pytest.raises(UserError, match=None) as info:
        pipeline.generate(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message and len(message) < 500, message


BATCH_CASES = [
    ("an-int", 5, "takes a list of GenerationRequest, not int"),
    ("none", None, "not NoneType"),
    ("a-string", "abc", "not str"),
    ("one-request-not-in-a-list", "request", "not GenerationRequest"),
    ("a-dict-in-the-list", [{"cond": None}], "request 0 is a dict"),
    ("none-in-the-list", ["request", None], "request 1 is a NoneType"),
]


@pytest.mark.parametrize("requests,needle", [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES])
def test_hostile_generate_batch_argument(pipeline, expected, requests, needle):
    """These were TypeError / AttributeError from inside generate_batch."""
    from taming_deploy.pipeline import GenerationRequest

    request = GenerationRequest(cond=expected["labels"].astype(np.uint8), greedy=True)
    requests = request if requests == "request" else [request if r == "request" else r for r in requests] \
        if isinstance(requests, list) else requests
    with pytest.raises(UserError) as info:
        pipeline.generate_batch(requests)
    assert needle in str(info.value) and "\n" not in str(info.value), str(info.value)


def test_generate_batch_takes_any_iterable_of_requests(pipeline, expected):
    from taming_deploy.pipeline import GenerationRequest

    requests = (GenerationRequest(cond=expected["labels"].astype(np.uint8), greedy=True, seed=k) for k in range(2))
    assert len(pipeline.generate_batch(requests)) == 2


def test_serve_on_a_port_in_use_is_one_line_before_ray_starts(tmp_path):
    import socket

    from helpers import assert_one_line_error, run_cli

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_cli("serve", "--port", str(port), timeout=120)
    assert proc.returncode == 2
    assert_one_line_error(proc, f"cannot listen on 127.0.0.1:{port}", "in use")


@pytest.mark.parametrize("args,needle", [((5,), "not int"), ((None, "xyz"), "'xyz'"), ((None, ["ort"]), "['ort']")],
                         ids=["path-an-int", "backend-unknown", "backend-a-list"])
def test_hostile_pipeline_load_argument(args, needle):
    from taming_deploy.pipeline import Pipeline

    with pytest.raises(UserError, match=None) as info:
        Pipeline.load(*args)
    assert needle in str(info.value)


@pytest.mark.parametrize("backend", [5, "ort", None], ids=["an-int", "a-backend-name", "none"])
def test_hostile_pipeline_constructor_argument(backend):
    """Pipeline(5) was an AttributeError ('int' object has no attribute 'spec')."""
    from taming_deploy.pipeline import Pipeline

    with pytest.raises(UserError, match="Pipeline takes a loaded backend, not") as info:
        Pipeline(backend)
    assert "Pipeline.load" in str(info.value)


def test_memory_estimate_counts_the_cache_of_every_image():
    """The embedded model's cache is n_layer x 2 x n x heads x block x head_dim float32: 6.4 MB an image."""
    from taming_deploy.bundle import Bundle
    from taming_deploy.model_paths import DEFAULT_MODEL
    from taming_deploy.validation import DECODER_BYTES_PER_PIXEL, generation_bytes

    spec = Bundle(DEFAULT_MODEL).spec
    per_image_cache = 6 * 2 * 8 * 512 * 32 * 4
    assert (spec.n_layer, spec.n_head, spec.block_size, spec.head_dim) == (6, 8, 512, 32)
    assert generation_bytes(spec, 10_000, (32, 32)) == 10_000 * (per_image_cache + 256 * 256 * DECODER_BYTES_PER_PIXEL)


def test_label_ids_are_never_wrapped_by_a_cast(pipeline, expected):
    """2**32 + 3 used to become 3 (a valid label) in the int32 cast; in range ids still work."""
    labels = expected["labels"].astype(np.int64)
    assert pipeline.generate(labels, greedy=True).tokens.shape[0] == 1
    with pytest.raises(UserError, match="out of range"):
        pipeline.generate(labels + 2**32, greedy=True)

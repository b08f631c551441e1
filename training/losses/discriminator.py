"""PatchGAN discriminator of the VQGAN first-stage loss (pix2pix's NLayerDiscriminator, BatchNorm variant).

Layout for the defaults (input_nc 3, ndf 64, n_layers 3), as in the original, parameter names ``main.N.*``:

    main.0  conv 3->64    k4 s2 p1 (bias)      main.1  LeakyReLU(0.2)
    main.2  conv 64->128  k4 s2 p1 (no bias)   main.3  BatchNorm   main.4  LeakyReLU(0.2)
    main.5  conv 128->256 k4 s2 p1 (no bias)   main.6  BatchNorm   main.7  LeakyReLU(0.2)
    main.8  conv 256->512 k4 s1 p1 (no bias)   main.9  BatchNorm   main.10 LeakyReLU(0.2)
    main.11 conv 512->1   k4 s1 p1 (bias)      -> a map of patch logits, 6x6 for a 64x64 input

Channel multiplier of the n-th strided conv: min(2**n, 8). The original's ActNorm option (``use_actnorm``)
is not offered; released configs use BatchNorm.
"""
from __future__ import annotations

from torch import nn


class NLayerDiscriminator(nn.Module):
    def __init__(self, input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        layers: list[nn.Module] = [nn.Conv2d(input_nc, ndf, kernel_size=4, stride=2, padding=1),
                                   nn.LeakyReLU(0.2)]
        mult = 1
        for n in range(1, n_layers + 1):  # strided blocks, then one stride-1 block (n == n_layers)
            prev, mult = mult, min(2 ** n, 8)
            layers += [nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2 if n < n_layers else 1,
                                 padding=1, bias=False),
                       nn.BatchNorm2d(ndf * mult),
                       nn.LeakyReLU(0.2)]
        layers.append(nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x)


def weights_init(module: nn.Module) -> None:
    """The original's init, for ``model.apply(weights_init)``: conv weights N(0, 0.02) (conv biases keep
    PyTorch's default init, as in the original), BatchNorm weight N(1, 0.02) and bias 0."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def make_discriminator(input_nc: int = 3, ndf: int = 64, n_layers: int = 3) -> NLayerDiscriminator:
    """A freshly initialised discriminator, the way the original builds it."""
    disc = NLayerDiscriminator(input_nc=input_nc, ndf=ndf, n_layers=n_layers)
    disc.apply(weights_init)
    return disc

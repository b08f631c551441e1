"""Where the sliding window sits for each token: the sampler's schedule, computed up front.

The original places a (wh x ww) window around every token (i, j):
    i0 = clamp(i - wh // 2, 0, H - wh),  j0 = clamp(j - ww // 2, 0, W - ww)
and predicts the token from the condition tokens plus the window's tokens before (i - i0, j - j0).
Consecutive tokens that share a placement can reuse the transformer cache, so the schedule groups
them. ``exact`` reproduces the original placement for every token; ``fast`` places the window once
for ``stride`` consecutive tokens of a row, centred on them so that they stay away from the window's
left and right edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from taming_deploy.errors import UserError

Mode = Literal["exact", "fast"]


@dataclass(frozen=True)
class Placement:
    top: int  # i0
    left: int  # j0
    targets: tuple[tuple[int, int], ...]  # (i, j) latent cells sampled under this placement, in order


def clamp(value: int, low: int, high: int) -> int:
    return max(low, min(value, high))


def window_shape(latent_hw: tuple[int, int], window: tuple[int, int]) -> tuple[int, int]:
    """The window, shrunk to the latent grid where the grid is smaller (the original crashes there)."""
    return min(window[0], latent_hw[0]), min(window[1], latent_hw[1])


def schedule(latent_hw: tuple[int, int], window: tuple[int, int], mode: Mode = "exact", stride: int = 8) -> list[Placement]:
    h, w = latent_hw
    wh, ww = window_shape(latent_hw, window)
    if mode == "fast" and not 1 <= stride <= ww:
        raise UserError(f"window stride must be between 1 and the window width {ww}, got {stride}")
    placements: list[Placement] = []
    current: tuple[int, int] | None = None
    targets: list[tuple[int, int]] = []
    for i in range(h):
        top = clamp(i - wh // 2, 0, h - wh)
        for j in range(w):
            if mode == "exact":
                left = clamp(j - ww // 2, 0, w - ww)
            else:
                chunk_start = j - j % stride
                left = clamp(chunk_start + stride // 2 - ww // 2, 0, w - ww)
            if (top, left) != current:
                if targets:
                    placements.append(Placement(current[0], current[1], tuple(targets)))  # type: ignore[index]
                current, targets = (top, left), []
            targets.append((i, j))
    placements.append(Placement(current[0], current[1], tuple(targets)))  # type: ignore[index]
    return placements

"""Which transformer calls run together: the sampler's plan, a pure function computed up front.

``windows.schedule`` says where the window sits for each token. Token (i, j) sees only the tokens
before it inside its own window, so a row can be sampled while the row above is still running, a
window's width behind it (at the left edge the window spans columns 0..ww-1, and the row's first
token sees all of them in the row above). The plan groups the calls into steps: every call of a step
has all the cells it sees sampled in earlier steps, so the calls of one step are independent and
the sampler runs them as one batch. Each call's placement, and so its context, is the sequential
schedule's; only the time at which it runs changes.

A chain is a run of calls that share one cache, in order: the targets of one placement, continued
on the next rows of a band while the window's top row stays put (for at most ``kept_per_band``
placements of a band, as the sequential sampler keeps them). Each chain holds one cache slot of the
pool from its first call to its last.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Literal

from taming_deploy.windows import Mode, schedule, window_shape

Order = Literal["wavefront", "sequential"]


@dataclass(frozen=True)
class Call:
    cell: tuple[int, int]  # (i, j): the latent cell this call samples
    top: int  # the window placement, as windows.schedule places it
    left: int
    target: int  # the cell's index in the window's raster order
    cached: int | None  # window tokens the chain's cache holds before this call; None: a prefill from position 0
    slot: int  # the cache of the pool the call's chain uses


@dataclass(frozen=True)
class Plan:
    steps: tuple[tuple[Call, ...], ...]  # in order; the calls of a step depend on no call of the same step
    slots: int  # caches in the pool


def plan(
    latent_hw: tuple[int, int],
    window: tuple[int, int],
    mode: Mode = "exact",
    stride: int = 8,
    kept_per_band: int = 1 << 30,
    order: Order = "wavefront",
) -> Plan:
    """``order="sequential"``: one call per step in raster order (the plain autoregressive loop)."""
    h, w = latent_hw
    wh, ww = window_shape(latent_hw, window)
    chains: list[list[tuple[tuple[int, int], int, int, int, int | None]]] = []  # (cell, top, left, target, cached)
    band_top, band_chains = None, {}  # left -> (chain index, window tokens its cache holds) in the current band
    for placement in schedule(latent_hw, window, mode, stride):
        top, left = placement.top, placement.left
        if top != band_top:
            band_top, band_chains = top, {}
        chain, cached = band_chains.get(left, (None, None))
        if chain is None:
            chain = len(chains)
            chains.append([])
        for i, j in placement.targets:
            target = (i - top) * ww + (j - left)
            chains[chain].append(((i, j), top, left, target, cached))
            cached = target
        if left in band_chains or len(band_chains) < kept_per_band:
            band_chains[left] = (chain, cached)

    step_of = [[-1] * w for _ in range(h)]
    timed: list[tuple[int, int, int]] = []  # (step, chain, index in chain)
    chain_step = [-1] * len(chains)  # the step of each chain's latest call so far
    position_of = {call[0]: (c, k) for c, calls in enumerate(chains) for k, call in enumerate(calls)}
    raster = 0
    for i in range(h):
        for j in range(w):
            c, k = position_of[(i, j)]
            _, top, left, _, _ = chains[c][k]
            if order == "sequential":
                step = raster
            else:  # the earliest step after everything the call needs: its chain's previous call and its context
                last_col = min(left + ww, w) - 1
                needs = [chain_step[c], step_of[i][j - 1] if j > 0 else -1]
                needs += [step_of[r][last_col] for r in range(top, i)]  # steps grow along a row: its last visible cell
                step = max(needs) + 1
            step_of[i][j] = chain_step[c] = step
            timed.append((step, c, k))
            raster += 1

    return Plan(*assign_slots(chains, sorted(timed)))


def assign_slots(chains: list[list[tuple]], timed: list[tuple[int, int, int]]) -> tuple[tuple[tuple[Call, ...], ...], int]:
    """Group the timed calls into steps and give each chain the lowest free cache slot from its first
    call to its last (chains starting together get consecutive slots where they can, so that their
    calls run as one batch over a contiguous range of the pool)."""
    ends = {c: step for step, c, _ in timed}  # sorted by step: the last one wins
    slot_of: dict[int, int] = {}
    free: list[int] = []
    slots = 0
    steps: list[tuple[Call, ...]] = []
    index = 0
    while index < len(timed):
        step = timed[index][0]
        batch = []
        while index < len(timed) and timed[index][0] == step:
            batch.append(timed[index])
            index += 1
        for _, c, _ in batch:
            if c not in slot_of:
                slot_of[c] = heapq.heappop(free) if free else slots
                slots = max(slots, slot_of[c] + 1)
        calls = []
        for _, c, k in batch:
            cell, top, left, target, cached = chains[c][k]
            calls.append(Call(cell, top, left, target, cached, slot_of[c]))
        steps.append(tuple(calls))
        for _, c, _ in batch:
            if ends[c] == step:
                heapq.heappush(free, slot_of.pop(c))
    return tuple(steps), slots

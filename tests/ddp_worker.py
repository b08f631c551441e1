"""Run under torchrun by test_training.py: two DDP optimisation steps of a stage, then every rank
reports a checksum of its weights so the test can compare ranks."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))
from training_fixtures import tiny_config  # noqa: E402

from taming_deploy.training import distributed  # noqa: E402
from taming_deploy.training.data.sources import SyntheticLandscapes  # noqa: E402
from taming_deploy.training.stages.cond import ConditionStage  # noqa: E402
from taming_deploy.training.stages.vqgan import VQGANStage  # noqa: E402


def checksums(state: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in state.items() if v.is_floating_point()}


def main(out: Path) -> None:
    env = distributed.setup()
    torch.manual_seed(env.rank)  # different init per rank: DDP must broadcast rank 0's weights
    source = SyntheticLandscapes()
    result = {}
    for name, stage_class in (("vqgan", VQGANStage), ("cond", ConditionStage)):
        stage = stage_class(tiny_config(name), env, source)
        for step in range(2):
            rng = np.random.default_rng([0, step, env.rank])
            stage.train_step([stage.sample_batch(rng)], step)
        weights, extra = stage.weights()
        result[name] = {"weights": checksums(weights), "extra": checksums(extra)}
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, result)
    if env.is_main:
        out.write_text(json.dumps(gathered))
    distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]))

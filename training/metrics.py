"""Training logs: a metrics JSONL always, TensorBoard scalars and image grids when it is installed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Append-only JSONL of {"step": s, name: value, ...}.

    On resume, rows past the resumed step (logged after the last checkpoint by a run that then died)
    are dropped, so the loss curve continues from the checkpoint without a duplicated stretch.
    """

    def __init__(self, run_dir: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        kept = []
        if self.path.exists():
            kept = [line for line in self.path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= resume_step]
        self.path.write_text("".join(line + "\n" for line in kept))
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional
                self.writer = None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{k: round(float(v), 6) for k, v in values.items()}}) + "\n")
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def images(self, step: int, name: str, grid: np.ndarray) -> None:
        """``grid``: (H, W, 3) uint8."""
        if self.writer is not None:
            self.writer.add_image(name, grid, step, dataformats="HWC")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

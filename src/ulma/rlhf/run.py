"""What the reward and PPO loops share with the main loop's outputs: the device, seeds,
``metrics.jsonl`` (one JSON row per ``train.log_every`` steps), trimming it on resume, and
the optimizer with its warmup + cosine schedule (:func:`ulma.train.lr_factor`)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ulma.atomic import atomic_write_text
from ulma.train import StepRows, fused_adamw, lr_factor, set_seed  # noqa: F401  (re-exported for the two loops)


def pick_device() -> torch.device:
    """One process: the first GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class MetricsLog:
    """``OUTPUT/metrics.jsonl``: appended row by row, so a crash keeps every finished step."""

    def __init__(self, out: Path):
        self.path = Path(out) / "metrics.jsonl"

    def write(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def truncate(self, step: int) -> None:
        """Drop rows after ``step``: a resumed run writes them again."""
        if not self.path.exists():
            return
        rows = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        atomic_write_text(self.path, "".join(r + "\n" for r in rows))


def make_optimizer(params: list, train_cfg, total_steps: int):
    """AdamW and the main loop's schedule: linear warmup, cosine to ``lr * min_lr_ratio``.
    ``train.fused_optimizer``: torch's fused AdamW (one kernel over all parameters) where
    they are on one CPU or CUDA device, as in the main loop (one process here)."""
    t = train_cfg
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay, betas=(0.9, 0.999),
                                  **fused_adamw(params, t.fused_optimizer))
    warmup = int(t.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup, t.min_lr_ratio))
    return optimizer, scheduler


def non_finite(*values) -> bool:
    return not all(bool(torch.isfinite(torch.as_tensor(v)).all()) for v in values)

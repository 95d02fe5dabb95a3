"""What a training run logs besides its checkpoints: TensorBoard scalars and the loss-curve PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from xwam_core.atomic import atomic_file
from xwam_core.objective import LOSS_TERMS


class Tracker:
    """TensorBoard scalars per loss term and learning rate (when tensorboard is installed)."""

    def __init__(self, log_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer: Any = SummaryWriter(str(log_dir))
        except ImportError:
            self.writer = None

    def log(self, step: int, logs: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in logs.items():
            tag = key if key in ("lr", "grad_norm") else f"loss/{key}"
            self.writer.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_losses(history: list[dict[str, float]], path: Path) -> None:
    if not history:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    steps = np.array([h["step"] for h in history])
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    for term in (*LOSS_TERMS, "loss"):
        values = np.array([h[term] for h in history])
        ax.plot(steps, values, label=term, lw=2 if term == "loss" else 1)
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="val loss", color="black")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp)
    plt.close(fig)

"""What a run leaves to read: the JSONL metrics log (committed with each checkpoint) and the loss curve."""
from __future__ import annotations

import json
from pathlib import Path

from model.atomic import atomic_open, atomic_write_text


class MetricsLog:
    """The run's JSONL metrics. Rows go to a hidden working file beside the log; the log itself
    is replaced (atomically) only when the run saves a checkpoint (``commit``), so a run that
    fails before or between saves leaves the previous log matching the previous checkpoint.
    A resumed run first drops the rows logged after the step it resumes from, so no step
    appears twice."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None, wandb_run=None):
        self.path, self.enabled, self.wandb = path, enabled, wandb_run
        self.work = path.with_name(f".{path.name}.run")
        self.resume_step = resume_step
        self.started = False

    def _start(self):
        self.started = True
        kept = []
        if self.resume_step is not None and self.path.is_file():
            kept = [r for r in self._read(self.path) if r.get("step", 0) <= self.resume_step]
        atomic_write_text(self.work, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, row: dict):
        if not self.enabled:
            return
        if not self.started:
            self._start()
        with self.work.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.wandb is not None:
            self.wandb.log(row, step=row.get("step"))

    def commit(self):
        """The rows so far become the log (called right after a checkpoint was saved)."""
        if self.enabled and self.started and self.work.is_file():
            atomic_write_text(self.path, self.work.read_text(encoding="utf-8", errors="replace"))

    def close(self):
        self.work.unlink(missing_ok=True)

    @staticmethod
    def _read(path: Path) -> list[dict]:
        rows = []
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by a crash
                continue
        return rows

    def rows(self) -> list[dict]:
        return self._read(self.work) if self.started and self.work.is_file() else []


def plot_losses(rows: list[dict], path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per answer token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)

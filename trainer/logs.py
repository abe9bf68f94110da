"""What a run leaves to read: the JSONL metrics log (committed with each checkpoint) and the loss curve."""
from __future__ import annotations

import json
from pathlib import Path

from infra.atomic import atomic_open, atomic_write_text


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
    """The loss curves on a log axis (late epochs, where the loss is small and may turn back up,
    stay visible) and, when the run validates, the validation exact match on a second axis."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on training machines
    import matplotlib.pyplot as plt
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r and r["loss"] > 0]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss")]
    fig, ax = plt.subplots(figsize=(7.5, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_yscale("log")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token (log scale)")
    ax.set_title(title)
    ax.grid(alpha=0.3, which="both")
    handles, labels = ax.get_legend_handles_labels()
    acc = {k: [(r["step"], 100 * r[f"val_{k}_acc"]) for r in rows if f"val_{k}_acc" in r] for k in ("closed", "open")}
    if any(acc.values()):
        right = ax.twinx()
        for (k, points), style in zip(acc.items(), ("s--", "^--")):
            if points:
                right.plot(*zip(*points), style, color="tab:green" if k == "closed" else "tab:purple",
                           label=f"validation exact match, {k} (%)")
        right.set_ylim(0, 100)
        right.set_ylabel("validation exact match (%)")
        more = right.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="lower left")
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)

"""The pictures an evaluation writes beside its numbers, for a reader who would rather look:

* ``baselines.png``: the model against the answer priors (answering every question with the
  commonest training answer of its type, or of its exact text), per answer type: the single
  most important result, since a model that does not read the image sits on the prior bars.
* ``reliability.png``: for the closed questions, how often the model is right at each level of
  confidence, with the number of questions in each bin; good calibration sits on the diagonal.
"""
from __future__ import annotations

from pathlib import Path

from infra.atomic import atomic_open

BASELINE_NAMES = {"majority_per_answer_type": "commonest answer of its type",
                  "majority_per_question": "commonest answer of its text (the prior)"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path):
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100, bbox_inches="tight")


def plot_baselines(metrics: dict, path: Path) -> bool:
    """Bars per answer type (closed, open, all): the model, then each baseline. False (nothing
    written) without baselines."""
    base = metrics.get("baselines") or {}
    if not base:
        return False
    plt = _pyplot()
    kinds = [("closed", "closed_accuracy"), ("open", "open_accuracy"), ("all", "overall_accuracy")]
    series = [("this model", metrics, "tab:blue")] + [(BASELINE_NAMES.get(k, k), b, c) for (k, b), c in
                                                      zip(base.items(), ("tab:gray", "tab:orange"))]
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for j, (label, m, colour) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(kinds))]
        values = [100 * (m.get(key) or 0.0) for _, key in kinds]
        bars = ax.bar(xs, values, width, label=label, color=colour)
        for bar, v in zip(bars, values):
            ax.text(bar.get_x() + bar.get_width() / 2, v + 1, f"{v:.0f}", ha="center", fontsize=8)
    ax.set_xticks(range(len(kinds)), [f"{k} questions" for k, _ in kinds])
    ax.set_ylabel("exact-match accuracy (%)")
    ax.set_ylim(0, 110)
    ax.set_title("the model against answering without the image\n(bars above the grey and orange ones: it reads "
                 "the image)", fontsize=10)
    ax.legend(fontsize=8, loc="upper right")
    _save(fig, path)
    plt.close(fig)
    return True


def plot_reliability(calib: dict, path: Path):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.8))
    for row in calib["reliability"]:
        lo, hi = row["bin"]
        ax.bar((lo + hi) / 2, row["accuracy"], width=hi - lo, edgecolor="k", alpha=0.7, color="tab:blue")
        ax.text((lo + hi) / 2, min(row["accuracy"] + 0.02, 0.95), f"n={row['count']}", ha="center", fontsize=7)
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration (bars reach the line)")
    ax.set_xlabel("confidence (probability of the chosen answer)")
    ax.set_ylabel("accuracy in the bin")
    ax.set_title(f"closed questions: ECE {100 * calib['ece']:.1f} % (0 is perfect), Brier {calib['brier']:.3f}",
                 fontsize=10)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, path)
    plt.close(fig)

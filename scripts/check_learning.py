"""Check that an evaluated model beats the answer-prior baselines (does it use the image?).

Run from the repository root, after eval_vlm.py:
    python -m scripts.check_learning out/eval/medical_vlm_768/metrics.json --margin 0.05
    python -m scripts.check_learning out/demo_hard/eval/medical_vlm_128/metrics.json --margin 0.15 --open_margin 0.30
Exits 1 when the model does not beat both baselines on CLOSED and OPEN questions by the margins.
"""
from __future__ import annotations

import argparse
import json
import sys


def margins(metrics: dict) -> dict[str, float]:
    out = {}
    for kind in ("closed_accuracy", "open_accuracy"):
        best = max(b[kind] or 0.0 for b in metrics["baselines"].values())
        out[kind] = (metrics[kind] or 0.0) - best
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("--margin", type=float, default=0.05, help="required lead over the best baseline")
    ap.add_argument("--open_margin", type=float, default=None, help="for OPEN questions (default: --margin)")
    args = ap.parse_args(argv)
    need = {"closed_accuracy": args.margin,
            "open_accuracy": args.margin if args.open_margin is None else args.open_margin}
    metrics = json.loads(open(args.metrics, encoding="utf-8").read())
    if not metrics.get("baselines"):
        print("no baselines in the metrics file (was the training file found?)", file=sys.stderr)
        return 1
    m = margins(metrics)
    ok = all(m[k] >= need[k] for k in m)
    print(f"lead over the best baseline: CLOSED {100 * m['closed_accuracy']:+.1f} points, "
          f"OPEN {100 * m['open_accuracy']:+.1f} points -> "
          + ("the model uses the image" if ok else "NOT a clear win (need CLOSED "
             f"+{100 * need['closed_accuracy']:.0f}, OPEN +{100 * need['open_accuracy']:.0f})"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

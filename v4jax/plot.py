"""Plots of a training run for people without TensorBoard: python -m v4jax.plot RUN_DIR [--out FILE.png]

Reads RUN_DIR/metrics.jsonl and draws, into one PNG (default RUN_DIR/metrics.png): the loss (with CE
and MTP) against the step, with the loss-spike rollbacks marked; the learning rate; and the expert
load as a heatmap (routed layers x steps, colour = max load / mean load of the layer, 1 = balanced).
Needs matplotlib (pip install matplotlib).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from .rundir import read_metrics


def series(recs: list[dict]) -> dict:
    """The step records (events apart) as arrays; a step logged twice (a rollback) keeps its last record."""
    by_step = {}
    for r in recs:
        if "event" not in r and "step" in r:
            by_step[r["step"]] = r
    steps = sorted(by_step)
    out = {"step": np.asarray(steps)}
    for k in ("loss", "ce", "mtp", "lr"):
        out[k] = np.asarray([by_step[s].get(k, np.nan) for s in steps], np.float64)
    loads = [by_step[s].get("max_load_ratio") for s in steps]
    if steps and all(x is not None for x in loads):
        out["max_load_ratio"] = np.asarray(loads, np.float64).T  # [routed layers, steps]
    out["spikes"] = np.asarray([r["step"] for r in recs if r.get("event") == "loss_spike"])
    return out


def plot(run_dir: str, out: str | None = None) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("error: python -m v4jax.plot needs matplotlib: pip install matplotlib") from None
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise SystemExit(f"error: {run_dir}: no metrics.jsonl (not a training run directory)")
    s = series(read_metrics(path, warn=lambda m: print(m, file=sys.stderr)))
    if not len(s["step"]):
        raise SystemExit(f"error: {path}: no step records yet")
    heat = "max_load_ratio" in s
    fig, axes = plt.subplots(3 if heat else 2, 1, figsize=(9, 9 if heat else 6), sharex=True)
    ax = axes[0]
    for k in ("loss", "ce", "mtp"):
        ax.plot(s["step"], s[k], label=k, lw=1.2 if k == "loss" else 0.8)
    for x in s["spikes"]:
        ax.axvline(x, color="red", alpha=0.3, lw=0.8)
    ax.set_ylabel("loss")
    ax.legend()
    axes[1].plot(s["step"], s["lr"], color="black", lw=1)
    axes[1].set_ylabel("learning rate")
    if heat:
        m = s["max_load_ratio"]
        im = axes[2].imshow(m, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                            extent=(s["step"][0] - 0.5, s["step"][-1] + 0.5, -0.5, m.shape[0] - 0.5))
        axes[2].set_ylabel("routed layer")
        fig.colorbar(im, ax=axes[2], label="max / mean expert load")
    axes[-1].set_xlabel("step")
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    fig.tight_layout()
    out = out or os.path.join(run_dir, "metrics.png")
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Plot a training run's metrics.jsonl to PNG")
    ap.add_argument("run_dir", help="the run directory (train.py --out)")
    ap.add_argument("--out", help="PNG file (default: RUN_DIR/metrics.png)")
    args = ap.parse_args(argv)
    print(plot(args.run_dir, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

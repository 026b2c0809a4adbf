"""``tfd-jax plot RUN``: a training run's curves as PNG files."""
from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "plot",
        help="draw a run's curves (loss, learning rate, task metrics, reward and KL) as PNG files",
        description=(
            "Read RUN/metrics.jsonl and write training.png (train/validation loss, learning rate, gradient "
            "norm), metrics.png (the task's own metrics, when it logs any) and rlhf.png (reward and KL, for a "
            "PPO run) into RUN/plots/ or --out."
        ),
    )
    p.add_argument("run", metavar="RUN", help="a training run directory (it holds metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="DIR", help="where to write the PNG files (default: RUN/plots)")
    p.add_argument("--dpi", type=int, default=110, help="resolution of the PNG files (default: 110)")
    p.set_defaults(func=main)


def plot_run(run: str | Path, out: str | Path | None = None, *, dpi: int = 110) -> list[Path]:
    """Write a run's pictures and return their paths (see the command's description)."""
    from tfd_jax import viz
    from tfd_jax.train.metrics import read_metrics

    run = Path(run)
    if not (run / "metrics.jsonl").is_file():
        what = "does not exist" if not run.exists() else "has no metrics.jsonl"
        raise ValueError(f"{run} {what}: give the directory of a training run (tfd-jax train --out DIR)")
    records = read_metrics(run)
    if not any(isinstance(r.get("loss"), (int, float)) or isinstance(r.get("val_loss"), (int, float))
               for r in records):
        raise ValueError(f"{run}/metrics.jsonl holds no logged step yet; plot again once the run has logged one")
    out = Path(out) if out is not None else run / "plots"
    name = run.resolve().name
    written = [viz.save(viz.training_curves(records, title=f"Training: {name}"), out / "training.png", dpi=dpi)]
    names = viz.metric_names(records)
    if {"reward", "kl"} <= set(names):
        written.append(viz.save(viz.rlhf_curves(records, title=f"RLHF: {name}"), out / "rlhf.png", dpi=dpi))
    if names:
        written.append(viz.save(viz.metric_curves(records, names, title=f"Metrics: {name}"), out / "metrics.png",
                                dpi=dpi))
    return written


def main(args: argparse.Namespace) -> int:
    if args.dpi < 10 or args.dpi > 1000:
        raise ValueError(f"--dpi must be between 10 and 1000, got {args.dpi}")
    for path in plot_run(args.run, args.out, dpi=args.dpi):
        print(path)
    return 0

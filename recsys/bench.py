"""`recsys bench data|train`: commands that print throughput figures (never timed assertions)."""

from __future__ import annotations

import argparse


def main(args: argparse.Namespace) -> int:
    """Run the named benchmark and print its figures."""
    if args.what == "data":
        from recsys.data.bench import bench_data

        bench_data(rows=args.rows)
    else:
        from recsys.bench_train import bench_train

        bench_train(steps=args.steps, reps=args.reps)
    return 0

"""`recsys bench NAME`: commands that print figures (never timed assertions); `--record` also writes them to
docs/benchmarks/results/NAME.txt."""

from __future__ import annotations

import argparse

from recsys.bench.record import Record


def main(args: argparse.Namespace, record: Record | None = None) -> int:
    """Run the named benchmark and print its figures; the plots it writes go to `record` (`--record`)."""
    record = record or Record(enabled=False)
    if args.what == "data":
        from recsys.bench.data import bench_data

        bench_data(rows=args.rows or 1_000_000)
    elif args.what == "checkpoint":
        from recsys.bench.checkpoint import bench_checkpoint

        bench_checkpoint()
    elif args.what == "quality":
        quality(args)
    elif args.what == "funnel":
        from recsys.bench.funnel import bench_funnel

        bench_funnel(quick=args.quick)
    elif args.what == "tables":
        from recsys.bench.tables import bench_tables

        bench_tables(rows=args.rows or 600_000, cardinality=args.cardinality, epochs=args.epochs)
    elif args.what == "prepare-scale":
        from recsys.bench.prepare_scale import PLOT, bench_prepare_scale, parse_sizes

        bench_prepare_scale(parse_sizes(args.sizes), cap=args.cap)
        record.keep(PLOT)
    elif args.what == "spark-scale":
        from recsys.bench.spark_scale import bench_spark_scale

        bench_spark_scale(rows=args.rows or 10_000_000)
    elif args.what == "train-scale":
        from recsys.bench.train_scale import bench_train_scale

        bench_train_scale(table_rows=args.table_rows, steps=args.steps, reps=args.reps)
    elif args.what == "continuous":
        from recsys.bench.continuous import bench_continuous

        bench_continuous(windows=args.windows, epochs=3 if args.quick else None)
    elif args.what == "recommend":
        from recsys.bench.recommend import bench_recommend

        bench_recommend(items=args.items or 1_000_000, queries=args.queries)
    elif args.what == "serving":
        from recsys.bench.serving import bench_serving

        bench_serving(
            args.items or 100_000, args.clients, args.requests, tuple(map(int, args.workers.split(",")))
        )
    else:
        from recsys.bench.train import bench_train

        bench_train(steps=args.steps, reps=args.reps)
    return 0


def quality(args: argparse.Namespace) -> None:
    """`bench quality`: each protocol asked for, each recorded in its own file (quality.txt, quality-loo.txt)."""
    import sys

    from recsys.bench.record import recorded

    argv, record = ["recsys", *sys.argv[1:]], args.record and not args.quick
    if args.protocol in ("random", "all"):
        from recsys.bench import history_random
        from recsys.bench.quality import bench_quality

        with recorded("quality", argv, record):
            bench_quality(
                quick=args.quick, split_name=args.split, config=args.ml100k_config, history_row=history_random
            )
    if args.protocol in ("loo", "all"):
        from recsys.bench.loo import bench_loo

        with recorded("quality-loo", argv, record):
            bench_loo(quick=args.quick)

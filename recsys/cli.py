"""The `recsys` command. Subcommands import their heavy modules only when they run, so `--help` is fast."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _add_config_args(p: argparse.ArgumentParser, required: bool = True, help: str | None = None) -> None:
    p.add_argument(
        "--config",
        "-c",
        required=required,
        default=None,
        help=help or "shipped config name (see `recsys config list`) or YAML path",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="a.b=v",
        help="override a config field (repeatable)",
    )


def _resolve(args: argparse.Namespace) -> Any:
    from recsys.config import load_config

    return load_config(args.config, args.overrides)


# ------------------------------------------------------------------------------------------- config
def _config_show(args: argparse.Namespace) -> int:
    from recsys.config import dump_config

    sys.stdout.write(dump_config(_resolve(args)))
    return 0


def _config_list(args: argparse.Namespace) -> int:
    from recsys.config import shipped_configs

    print("\n".join(shipped_configs()))
    return 0


def _config_schema(args: argparse.Namespace) -> int:
    import json

    from recsys.config import Config

    print(json.dumps(Config.model_json_schema(), indent=1))
    return 0


# --------------------------------------------------------------------------------------------- data
def _data_synth(args: argparse.Namespace) -> int:
    from recsys.data.synth import synthesize

    synthesize(_resolve(args), overwrite=args.overwrite)
    return 0


def _data_prepare(args: argparse.Namespace) -> int:
    import json

    from recsys.errors import UserError

    for flag in ("since", "until", "previous"):  # shorthands of data.window.*, as text (JSON is YAML)
        if getattr(args, flag) is not None:
            args.overrides = [*args.overrides, f"data.window.{flag}={json.dumps(getattr(args, flag))}"]
    cfg = _resolve(args)
    if args.skip_bad_rows:
        cfg.data.skip_bad_rows = True
    if args.spark:
        try:
            import pyspark  # noqa: F401
        except ImportError:
            raise UserError(
                "--spark needs pyspark: `pip install 'recsys[spark]'` (pyspark 4.3.0) and Java 17+"
            ) from None
        from recsys.data.spark_mds import prepare_on_spark

        prepare_on_spark(cfg, overwrite=args.overwrite, remote=args.remote)
        return 0
    if args.remote:
        raise UserError("--remote is only for --spark (upload the MDS shards to an object store)")
    from recsys.data.prepare import prepare

    prepare(cfg, overwrite=args.overwrite)
    return 0


def _data_candidates(args: argparse.Namespace) -> int:
    from recsys.retrieval.candidates import build_candidates

    fold_runs = [r for r in args.fold_runs.split(",") if r] if args.fold_runs else None
    build_candidates(_resolve(args), args.run_id, args.tracking_uri, fold_runs, args.overwrite)
    return 0


# ------------------------------------------------------------------------------------ train / eval
def _train(args: argparse.Namespace) -> int:
    from recsys.train import train

    cfg = _resolve(args)
    if args.init_from:
        cfg.train.init_from = args.init_from
    result = train(cfg, resume=args.resume, allow_data_mismatch=args.allow_data_mismatch)
    if args.run_id_file and result.run_id and os.environ.get("RANK", "0") == "0":
        Path(args.run_id_file).write_text(result.run_id + "\n")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from recsys.errors import UserError
    from recsys.evaluate import evaluate_run
    from recsys.retrieval.funnel import evaluate_funnel

    if args.ranker_run_id:
        try:
            candidates = tuple(int(n) for n in args.candidates.split(","))
        except ValueError:
            raise UserError(
                f"--candidates {args.candidates!r}: expected integers like 100 or 20,50,100"
            ) from None
        out = evaluate_funnel(
            args.run_id, args.ranker_run_id, args.tracking_uri, candidates, args.split,
            config=args.config, overrides=args.overrides, ranker_overrides=args.ranker_overrides,
        )  # fmt: skip
        for k, v in out.items():
            print(f"{args.split}/{k:<28} {v:.5f}")
        return 0
    if args.config is None:
        raise UserError(
            "recsys evaluate: --config is required (the run's training config) without --ranker-run-id"
        )
    evaluate_run(_resolve(args), run_id=args.run_id)
    return 0


# ---------------------------------------------------------------------------------------- retrieval
def _add_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-id", required=True, help="MLflow run id of a trained Two-Tower, or models:/NAME@ALIAS"
    )
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else ./runs)",
    )
    _add_config_args(
        p, required=False, help="config name or YAML path (default: the run's config/resolved.yaml)"
    )


def _index_build(args: argparse.Namespace) -> int:
    from recsys.retrieval.index import IndexParams, build_run_index

    params = IndexParams(args.kind, args.nlist, args.nprobe, args.m, ef_search=args.ef_search)
    idx = build_run_index(args.run_id, args.tracking_uri, params, args.config, args.overrides, args.recall_k)
    recall = idx.facts[f"recall_at_{args.recall_k}"]
    print(
        f"index {args.kind}: {idx.index.ntotal:,} items x dim {idx.index.d}, recall@{args.recall_k} "
        f"{recall:.4f} vs exact, built in {idx.facts['build_seconds']:.2f} s; logged as index/ of run {args.run_id}"
    )
    return 0


def _recommend(args: argparse.Namespace) -> int:
    import os

    from recsys.retrieval.recommend import parse_exclude, recommend

    distributed = args.nproc is not None or args.render or "WORLD_SIZE" in os.environ
    if args.history_file and (args.ranker_run_id or distributed):
        from recsys.errors import UserError

        raise UserError(
            "--history-file: one process only, without --ranker-run-id, --nproc, --render or torchrun"
        )
    if args.ranker_run_id:
        return _recommend_ranked(args)
    # Under torchrun (WORLD_SIZE set), with --nproc or --render: parts + manifest (retrieval/batch.py).
    if distributed:
        from recsys.retrieval.batch import batch_main

        return batch_main(args)
    rec = recommend(
        args.run_id,
        args.tracking_uri,
        args.users,
        args.k,
        parse_exclude(args.exclude),
        args.output,
        args.config,
        args.overrides,
        args.history_file,
    )
    if rec.unknown_items is not None:
        print(
            f"{rec.table.num_rows:,} recommendations for {rec.users:,} users from their histories "
            f"({rec.fallback:,} users the run never saw; {rec.unknown_items:,} unknown history items "
            f"dropped) -> {args.output} in {rec.seconds:.1f} s (index: {rec.index})"
        )
        return 0
    print(
        f"{rec.table.num_rows:,} recommendations for {rec.users:,} users ({rec.fallback:,} unknown: "
        f"popularity) -> {args.output} in {rec.seconds:.1f} s (index: {rec.index})"
    )
    return 0


def _recommend_ranked(args: argparse.Namespace) -> int:
    from recsys.errors import UserError
    from recsys.retrieval.rank import retrieve_and_rank
    from recsys.retrieval.recommend import parse_exclude

    if args.nproc is not None or args.render:
        raise UserError("--ranker-run-id: re-ranking runs in one process; drop --nproc/--render")
    rec = retrieve_and_rank(
        args.run_id,
        args.ranker_run_id,
        args.tracking_uri,
        args.users,
        args.candidates,
        args.k,
        parse_exclude(args.exclude),
        args.output,
        args.config,
        args.overrides,
        args.ranker_overrides,
    )
    print(
        f"{rec.table.num_rows:,} re-ranked recommendations (top {args.k} of {args.candidates} candidates) for "
        f"{rec.users:,} users ({rec.fallback:,} unknown: popularity) -> {args.output} in {rec.seconds:.1f} s"
    )
    return 0


def _serve_build(args: argparse.Namespace) -> int:
    from recsys.retrieval.serve import build_model

    if args.ranker_run_id:  # retrieve → rank behind one endpoint
        from recsys.retrieval.serve_two_stage import build_two_stage

        built = build_two_stage(
            args.run_id, args.ranker_run_id, args.tracking_uri, args.register, args.candidates,
            args.ranker_overrides,
        )  # fmt: skip
    else:
        built = build_model(args.run_id, args.tracking_uri, args.register)
    where = f"registered as {built.name} version {built.version}" if built.name else "not registered"
    print(f"serving model {built.model_uri} ({where}); files at {built.artifact_uri}")
    return 0


def _serve_render(args: argparse.Namespace) -> int:
    from recsys.launch.kserve import render_to_file
    from recsys.promotion.registry import parse_alias_uri, parse_version_uri

    # models:/NAME@ALIAS or models:/NAME/VERSION → the files of that version (KServe reads no models:/).
    if parse_alias_uri(args.storage_uri) or parse_version_uri(args.storage_uri):
        from recsys.promotion.registry import storage_location
        from recsys.retrieval.runs import tracking_uri

        args.storage_uri = storage_location(args.storage_uri, tracking_uri(args.tracking_uri))
    from recsys.launch.kserve_two_stage import inference_service_for

    cfg = _resolve(args)
    render_to_file(cfg, args, out=args.output, doc=inference_service_for(cfg, args))
    return 0


def _promote(args: argparse.Namespace) -> int:
    from recsys.promotion.gate import REFUSED_EXIT, promote

    d = promote(args.candidate, args.data, args.tracking_uri, args.model, args.margin, args.metric)
    print(d.line())
    return 0 if d.promoted else REFUSED_EXIT


# ---------------------------------------------------------------------------------- render / launch
def _render(args: argparse.Namespace) -> int:
    from recsys.launch.kube import render_command, render_to_file
    from recsys.launch.spark_app import check_backend_choice

    if args.recurring_run or args.cronjob:
        return _render_schedule(args)
    check_backend_choice(args.backend, args.data_prep)
    if args.data_prep:
        from recsys.launch import spark_app

        cmd = spark_app.render_command(args.config, args.overrides, args.output)
        spark_app.render_to_file(_resolve(args), out=args.output, generated_by=cmd)
        return 0
    if args.size_from_plan:
        from recsys.plan import pod_memory_override

        args.overrides = [*args.overrides, pod_memory_override(_resolve(args), args.size_from_plan)]
    # The file's first line names the command that reproduces it.
    cmd = render_command(args.config, args.backend, args.overrides, args.output)
    render_to_file(_resolve(args), backend=args.backend, out=args.output, generated_by=cmd)
    return 0


def _render_schedule(args: argparse.Namespace) -> int:
    import json

    from recsys.errors import UserError
    from recsys.launch.kube import command_line, write_rendered
    from recsys.promotion import schedule

    if args.recurring_run and args.cronjob or not args.cron:
        raise UserError("recsys render: pass one of --recurring-run and --cronjob, with --cron '0 3 * * *'")
    target = ["--recurring-run" if args.recurring_run else "--cronjob", "--cron", args.cron]
    for flag in ("backend", "model"):
        if getattr(args, flag):
            target += [f"--{flag}", getattr(args, flag)]
    generated_by = command_line(target, args.config, args.overrides, args.output)
    if args.cronjob:
        path = args.output if args.output != "-" else "<file>"
        text = schedule.render_cronjob(
            _resolve(args), args.cron, args.backend or "pytorchjob", args.model, generated_by, path
        )
        write_rendered(text, args.output, f"CronJob running `recsys daily` on {args.cron!r}")
        return 0
    _resolve(args)  # a bad config or override fails here, not in the first scheduled run
    params: dict = {"config": args.config, "overrides": args.overrides}
    if args.backend:
        params["backend"] = args.backend
    if args.model:
        params["model_name"] = args.model
    spec = schedule.pipeline_spec(args.pipeline_yaml)
    body = schedule.recurring_run(args.cron, spec, params, f"recsys-continuous-{args.config}")
    write_rendered(json.dumps(body, indent=1) + "\n", args.output, "KFP recurring run request body")
    return 0


def _daily(args: argparse.Namespace) -> int:
    import datetime as dt

    from recsys.promotion.daily import run_turn

    until = args.until or dt.datetime.now(dt.UTC).date().isoformat()
    turn = run_turn(
        args.config, args.overrides, args.backend, args.data_root, until, args.days, args.model, args.k
    )
    print(turn.line)
    if turn.recommendations:
        print(f"recommendations: {turn.recommendations}")
    return 0


def _plan(args: argparse.Namespace) -> int:
    from recsys import plan

    return plan.main(args, _resolve(args))


def _tune(args: argparse.Namespace) -> int:
    from recsys import tune

    return tune.main(args)


def _launch(args: argparse.Namespace) -> int:
    from recsys.launch import launch

    # The shorthands are job-section overrides, so every backend reads one resolved job size.
    if args.num_processes is not None:
        args.overrides = [*args.overrides, f"job.procs_per_node={args.num_processes}"]
    cfg = _resolve(args)
    if args.use_gpu and not cfg.job.gpus_per_node:
        args.overrides = [*args.overrides, f"job.gpus_per_node={cfg.job.procs_per_node}"]
        cfg = _resolve(args)
    return launch(cfg, args)


def _bench(args: argparse.Namespace) -> int:
    from recsys import bench
    from recsys.bench.record import recorded

    if args.what == "quality":  # records one file per protocol itself (quality.txt, quality-loo.txt)
        return bench.main(args)
    with recorded(args.what, ["recsys", *sys.argv[1:]], enabled=args.record and not args.quick) as record:
        return bench.main(args, record)


def _chaos(args: argparse.Namespace) -> int:
    from recsys import chaos
    from recsys.bench.record import recorded

    with recorded("chaos", ["recsys", *sys.argv[1:]], enabled=args.record, title="recsys chaos"):
        return chaos.main(args.only or None, keep=args.keep)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `recsys` command."""
    parser = argparse.ArgumentParser(
        prog="recsys", description="Train TorchRec recommenders anywhere: laptop, Kubeflow, Spark."
    )
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="show library warnings (hidden by default)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(
        parent: Any, name: str, fn: Callable[[argparse.Namespace], int], help: str, config: bool = True
    ) -> Any:
        p = parent.add_parser(name, help=help, description=help)
        if config:
            _add_config_args(p)
        p.set_defaults(fn=fn)
        return p

    cfg = sub.add_parser("config", help="list, show (resolved) or describe configs").add_subparsers(
        dest="sub", required=True
    )
    add(cfg, "show", _config_show, "print the resolved config as YAML")
    add(cfg, "list", _config_list, "list the shipped configs", config=False)
    add(cfg, "schema", _config_schema, "print the config's JSON schema (every field described)", config=False)

    data = sub.add_parser("data", help="synthesize raw data; prepare MDS shards").add_subparsers(
        dest="sub", required=True
    )
    p = add(data, "synth", _data_synth, "write synthetic raw data (interactions or Criteo-layout TSV)")
    p.add_argument("--overwrite", action="store_true", help="replace existing raw files")
    p = add(
        data, "prepare", _data_prepare, "raw data → vocabularies, splits, MDS train/val/test + metadata.json"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared_dir")
    p.add_argument(
        "--skip-bad-rows", action="store_true", help="skip and count malformed rows instead of stopping"
    )
    p.add_argument(
        "--spark",
        action="store_true",
        help="prepare with Spark (data.source kind 'table': Parquet, CSV or a catalog table)",
    )
    p.add_argument(
        "--remote", default=None, help="with --spark: also upload to this object-store URI (s3://, dbfs:/ …)"
    )
    p.add_argument(
        "--since",
        default=None,
        help="data.window.since: first timestamp kept (ISO date/date-time or epoch s)",
    )
    p.add_argument("--until", default=None, help="data.window.until: keep timestamps before this (exclusive)")
    p.add_argument(
        "--previous",
        default=None,
        help="data.window.previous: earlier prepared folder whose vocabularies grow",
    )

    p = add(
        data, "candidates", _data_candidates,
        "ranker rows from a Two-Tower run's top-N (cross-fitted hard negatives; data.candidates)",
    )  # fmt: skip
    p.add_argument("--run-id", required=True, help="MLflow run id of the Two-Tower whose candidates to rank")
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI of the run")
    p.add_argument(
        "--fold-runs", default=None, metavar="ID,ID,…",
        help="reuse the fold retrievers an earlier run of this command trained (one per fold, in order)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared_dir")

    p = add(sub, "train", _train, "train the configured model (run under torchrun for several processes)")
    p.add_argument(
        "--resume",
        default="auto",
        metavar="auto|never|PATH",
        help="auto: continue this job's newest unfinished run from its last complete checkpoint; "
        "never: start fresh; PATH: a checkpoint (step-NNNNNNNN) or run folder (default: auto)",
    )
    p.add_argument(
        "--allow-data-mismatch",
        action="store_true",
        help="train even when the prepared folder was made from other data settings than the config's",
    )
    p.add_argument(
        "--init-from",
        default=None,
        metavar="RUN_ID|CHECKPOINT_DIR",
        help="warm start from a previous run's weights (sets train.init_from; rows matched by raw id; "
        "a checkpoint of this job found by --resume auto wins)",
    )
    p.add_argument(
        "--run-id-file",
        default=None,
        metavar="PATH",
        help="write the MLflow run id to PATH when training ends (for scripts: RUN_ID=$(cat PATH))",
    )
    p = add(
        sub,
        "evaluate",
        _evaluate,
        "evaluate a trained model from its MLflow run on the test split (or retrieval vs retrieve → rank)",
        config=False,
    )
    _add_config_args(p, required=False, help="config name or YAML path (required without --ranker-run-id)")
    p.add_argument("--run-id", required=True, help="MLflow run id holding the model")
    p.add_argument(
        "--ranker-run-id",
        default=None,
        help="score the Two-Tower --run-id alone and re-ranked by this DLRM/DCN run (Recall/NDCG@10)",
    )
    p.add_argument(
        "--candidates", default="100", help="retrieved items per user to re-rank; comma-separated to compare"
    )
    p.add_argument("--split", choices=["val", "test"], default="test", help="choose --candidates on val")
    p.add_argument(
        "--tracking-uri", default=None, help="MLflow tracking URI of the runs (with --ranker-run-id)"
    )
    p.add_argument(
        "--ranker-set", dest="ranker_overrides", action="append", default=[], metavar="a.b=v",
        help="override a field of the ranker run's config (repeatable)",
    )  # fmt: skip

    index = sub.add_parser("index", help="FAISS index of a Two-Tower run's item embeddings").add_subparsers(
        dest="sub", required=True
    )
    p = add(
        index,
        "build",
        _index_build,
        "index a run's item embeddings (flat = exact; ivf/hnsw measure recall@K) and log it as index/",
        config=False,
    )
    _add_run_args(p)
    p.add_argument(
        "--kind", choices=["flat", "ivf", "hnsw"], default="flat", help="flat (exact), ivf or hnsw"
    )
    p.add_argument("--nlist", type=int, default=None, help="ivf lists (default: ~4·sqrt(items))")
    p.add_argument("--nprobe", type=int, default=32, help="ivf lists searched per query")
    p.add_argument("--m", type=int, default=32, help="hnsw links per node")
    p.add_argument("--ef-search", type=int, default=128, help="hnsw candidates per search")
    p.add_argument("--recall-k", type=int, default=100, help="K of the recall@K measured against exact")
    p = add(
        sub,
        "recommend",
        _recommend,
        "top-K unseen items per user of a Two-Tower run -> Parquet",
        config=False,
    )
    _add_run_args(p)
    p.add_argument(
        "--users",
        default="all",
        help="'all', or a file of raw user ids (one a line, or Parquet/CSV column 'user')",
    )
    p.add_argument("--k", type=int, default=100, help="items per user")
    p.add_argument(
        "--history-file",
        default=None,
        help="users' recent items (Parquet/CSV user,item[,timestamp] or JSON lines {user, history}): "
        "user vectors from them (runs whose model reads histories)",
    )
    p.add_argument(
        "-o",
        "--output",
        required=True,
        help="output Parquet: user, rank, item, score, fallback (a folder of parts under torchrun/--nproc)",
    )
    p.add_argument(
        "--exclude",
        default="train",
        help="splits whose items a user has seen: train, train,val, train,val,test, none",
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=None,
        help="batch inference on N local processes (torchrun): -o is a folder of parts + manifest.json",
    )
    p.add_argument(
        "--render",
        choices=["pytorchjob", "trainjob"],
        default=None,
        help="print a ConfigMap + PyTorchJob/TrainJob running this command (-o: a path in the pods)",
    )
    p.add_argument(
        "--ranker-run-id",
        default=None,
        help="retrieve --candidates with the Two-Tower, re-rank them with this DLRM/DCN run, keep --k",
    )
    p.add_argument("--candidates", type=int, default=100, help="items retrieved per user for the ranker")
    p.add_argument(
        "--ranker-set", dest="ranker_overrides", action="append", default=[], metavar="a.b=v",
        help="override a field of the ranker run's config (repeatable), e.g. data.prepared_dir=PATH",
    )  # fmt: skip

    serve = sub.add_parser("serve", help="serve a Two-Tower run: MLflow pyfunc model, KServe").add_subparsers(
        dest="sub", required=True
    )
    p = add(
        serve, "build", _serve_build, "log a run's retrieval model (pyfunc) and register it", config=False
    )
    p.add_argument(
        "--run-id", required=True, help="MLflow run id of a trained Two-Tower, or models:/NAME@ALIAS"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")
    p.add_argument(
        "--register", default=None, help="registered model name (default: recsys-<config name>; '' = none)"
    )
    p.add_argument(
        "--ranker-run-id", default=None,
        help="a ranking run: serve retrieve → rank as one model (docs/guides/two-stage-serving.md)",
    )  # fmt: skip
    p.add_argument(
        "--candidates", type=int, default=None,
        help="items retrieved per request for the ranker (default: the ranker run's funnel.candidates tag, "
        "else its data.candidates.top_n, else 100)",
    )  # fmt: skip
    p.add_argument(
        "--ranker-set", dest="ranker_overrides", action="append", default=[], metavar="a.b=v",
        help="override a field of the ranker run's config (repeatable), e.g. data.prepared_dir=PATH",
    )  # fmt: skip
    p = add(serve, "render", _serve_render, "render a KServe InferenceService for a registered model")
    p.add_argument(
        "--storage-uri",
        required=True,
        help="where the model files are: s3://…, gs://…, pvc://<claim>/<path>, or models:/NAME@ALIAS or "
        "models:/NAME/VERSION (resolved)",
    )
    p.add_argument("--name", default=None, help="InferenceService name (default: recsys-<config name>)")
    p.add_argument("--namespace", default=None, help="namespace (default: job.namespace)")
    p.add_argument("--image", default=None, help="serving image with faiss-cpu (the runtime's own has none)")
    p.add_argument("--service-account", default=None, help="ServiceAccount with storage credentials")
    p.add_argument("-o", "--output", default="-", help="output file ('-' for stdout)")
    p.add_argument(
        "--tracking-uri",
        default=None,
        help="MLflow tracking URI resolving a models:/NAME@ALIAS or models:/NAME/VERSION --storage-uri",
    )
    p.add_argument(
        "--two-stage", action="store_true",
        help="the model is `serve build --ranker-run-id`'s (retrieve → rank): name recsys-<config name>-two-stage, torch env",
    )  # fmt: skip
    p.add_argument(
        "--torch-threads", type=int, default=None,
        help="torch intra-op threads per server worker (RECSYS_SERVE_TORCH_THREADS; --two-stage default 1)",
    )  # fmt: skip

    p = add(
        sub,
        "promote",
        _promote,
        "gate a candidate run against the registered champion on a new data window; promoted: "
        "index + served version rebuilt, alias champion moved (exit 0; refused: exit 3)",
        config=False,
    )
    p.add_argument("--candidate", required=True, help="MLflow run id of the newly trained run")
    p.add_argument(
        "--data", required=True, help="prepared folder of the newest window (neither model trained on it)"
    )
    p.add_argument("--model", default=None, help="registered model name (default: promotion.model_name)")
    p.add_argument(
        "--margin",
        type=float,
        default=None,
        help="allowed shortfall vs the champion (default: promotion.margin)",
    )
    p.add_argument(
        "--metric", default=None, help="metric compared, e.g. ndcg@10 or auc (default: promotion.metric)"
    )
    p.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI)")

    p = add(
        sub,
        "tune",
        _tune,
        "search config fields with Optuna (trials as MLflow child runs), or render a Katib Experiment",
    )
    p.add_argument(
        "--space", required=True, help="search space YAML: metric, mode, params (field → distribution)"
    )
    p.add_argument("--trials", type=int, default=10, help="number of trials (Katib: maxTrialCount)")
    p.add_argument("--seed", type=int, default=0, help="seed of the TPE sampler")
    p.add_argument(
        "-o",
        "--output",
        default="-",
        help="best config YAML, or the Katib file with --render-katib ('-': stdout)",
    )
    p.add_argument(
        "--workdir", default=None, help="trial checkpoint folders (default: runs/tune/<config name>)"
    )
    p.add_argument(
        "--prune-startup", type=int, default=2, help="trials that complete before the median pruner acts"
    )
    p.add_argument("--no-prune", action="store_true", help="train every trial to the end")
    p.add_argument(
        "--render-katib", action="store_true", help="render a Katib Experiment instead of tuning here"
    )
    p.add_argument("--parallel", type=int, default=2, help="Katib parallelTrialCount")

    p = add(
        sub,
        "render",
        _render,
        "render Kubernetes manifests (ConfigMap + PyTorchJob or TrainJob; or the Spark prepare's SparkApplication)",
    )
    p.add_argument("--backend", choices=["pytorchjob", "trainjob"], default=None)
    p.add_argument(
        "--data-prep",
        choices=["spark"],
        default=None,
        help="render the data prepare instead: a Kubeflow Spark Operator SparkApplication",
    )
    p.add_argument("-o", "--output", default="-", help="output file ('-' for stdout)")
    p.add_argument(
        "--size-from-plan",
        default=None,
        metavar="PLAN.json",
        help="set job.memory from a `recsys plan --output` file (the busiest node's table host memory + margin)",
    )
    p.add_argument(
        "--recurring-run",
        action="store_true",
        help="render the Kubeflow Pipelines recurring-run request (JSON) of the continuous pipeline",
    )
    p.add_argument(
        "--cronjob", action="store_true", help="render a Kubernetes CronJob running `recsys daily`"
    )
    p.add_argument("--cron", default=None, help="schedule, five cron fields in UTC, e.g. '0 3 * * *'")
    p.add_argument("--model", default=None, help="registered model name (default: promotion.model_name)")
    p.add_argument(
        "--pipeline-yaml",
        default="pipelines/continuous_pipeline.yaml",
        help="compiled continuous pipeline (--recurring-run)",
    )

    p = add(
        sub,
        "daily",
        _daily,
        "one turn of continuous training: prepare the newest window, train on the one before it "
        "(warm start from the champion), gate it (recsys promote), recommend with the champion",
    )
    p.add_argument(
        "--backend", choices=["local", "pytorchjob", "trainjob"], default="local", help="where training runs"
    )
    p.add_argument("--data-root", required=True, help="folder holding windows/<since>_<until>/")
    p.add_argument("--until", default=None, help="end of the newest window, YYYY-MM-DD (default: today, UTC)")
    p.add_argument("--days", type=int, default=1, help="days per window")
    p.add_argument("--model", default=None, help="registered model name (default: promotion.model_name)")
    p.add_argument("--k", type=int, default=100, help="items recommended per user")

    p = add(
        sub,
        "plan",
        _plan,
        "run TorchRec's sharding planner for a target cluster (no GPU needed): per table sharding and "
        "kernel, per rank memory, step estimate, or why it does not fit",
    )
    p.add_argument("--nodes", type=int, default=None, help="nodes (default: job.nodes)")
    p.add_argument(
        "--gpus-per-node", type=int, default=None, help="GPUs per node (default: job.gpus_per_node; 0: CPU)"
    )
    p.add_argument("--hardware", choices=["h100", "h200"], default="h100", help="GPU node preset")
    p.add_argument("--hbm-gb", type=float, default=None, help="HBM per GPU, GiB (overrides the preset)")
    p.add_argument("--ddr-gb", type=float, default=None, help="host memory per GPU/process, GiB")
    p.add_argument("--intra-bw", type=float, default=None, help="GPU-GPU bandwidth within a node, GB/s")
    p.add_argument(
        "--inter-bw", type=float, default=None, help="network bandwidth per GPU between nodes, GB/s"
    )
    p.add_argument(
        "--tables",
        default=None,
        help="declared tables instead of the prepared metadata: criteo-1tb, N×ROWS (26x1000000) or name=rows,…",
    )
    p.add_argument("--max-rows", type=int, default=None, help="cap every table at this many rows")
    p.add_argument("--num-dense", type=int, default=13, help="dense features of declared DLRM tables")
    p.add_argument(
        "--uvm-caching", action="store_true", help="allow UVM caching kernels (train.sharding.uvm_caching)"
    )
    p.add_argument(
        "-o", "--output", default=None, help="also write the plan as JSON (for render --size-from-plan)"
    )

    p = add(
        sub, "launch", _launch, "launch training: local torchrun, Kubernetes (PyTorchJob/TrainJob) or Spark"
    )
    p.add_argument("--backend", choices=["local", "pytorchjob", "trainjob", "spark"], required=True)
    p.add_argument("--wait", action="store_true", help="kubernetes: wait for the job to finish")
    p.add_argument("--logs", action="store_true", help="kubernetes: stream the master's logs")
    p.add_argument("--timeout", type=float, default=None, help="seconds to wait before giving up (exit 1)")
    p.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="processes per node: shorthand for --set job.procs_per_node=N",
    )
    p.add_argument(
        "--local-mode",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="spark: torchrun on the driver (default when job.nodes is 1) or one node per executor",
    )
    p.add_argument(
        "--use-gpu", action="store_true", help="one GPU per process: shorthand for job.gpus_per_node"
    )

    p = add(sub, "bench", _bench, "print throughput figures", config=False)
    p.add_argument(
        "what",
        choices=[
            "data",
            "train",
            "train-scale",
            "checkpoint",
            "recommend",
            "quality",
            "funnel",
            "tables",
            "prepare-scale",
            "spark-scale",
            "continuous",
            "serving",
        ],
    )
    p.add_argument(
        "--record",
        action="store_true",
        help="also write the printed figures, with date, commit and machine load, to "
        "docs/benchmarks/results/NAME.txt, and a plot the bench draws to NAME.png (what the docs show; "
        "the make bench-* targets pass it)",
    )
    p.add_argument(
        "--rows",
        type=int,
        default=None,
        help="rows to convert and read (data: 1M), to generate (tables: 600k), to prepare (spark-scale: 10M)",
    )
    p.add_argument("--cardinality", type=int, default=1000, help="values per sparse feature (tables)")
    p.add_argument(
        "--windows", type=int, default=6, help="continuous: time windows of ML-100K (the last: test only)"
    )
    p.add_argument("--epochs", type=int, default=2, help="training epochs per table setting (tables)")
    p.add_argument(
        "--table-rows", type=int, default=1_000_000, help="rows of each of the 26 tables (train-scale)"
    )
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement (train)")
    p.add_argument("--reps", type=int, default=3, help="interleaved bare/full repetitions (train)")
    p.add_argument("--items", type=int, default=None, help="catalogue size (recommend: 1M; serving: 100k)")
    p.add_argument("--clients", type=int, default=4, help="serving: concurrent closed-loop clients")
    p.add_argument("--requests", type=int, default=100, help="serving: timed requests per client and case")
    p.add_argument(
        "--workers", default="1,2", help="serving: mlflow models serve --workers, comma-separated to compare"
    )
    p.add_argument("--queries", type=int, default=10_000, help="users searched per measurement (recommend)")
    p.add_argument("--sizes", default="1e6,4e6,16e6", help="prepare-scale: row counts, comma-separated")
    p.add_argument(
        "--cap",
        type=int,
        default=None,
        help="prepare-scale: also run the sizes on data with every feature capped at CAP distinct ids",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="quality, funnel: 1 seed, a one-point grid, few epochs (a smoke run); continuous: 3 epochs per run",
    )
    p.add_argument(
        "--split",
        choices=["random", "leave-last"],
        default="random",
        help="quality: random 80/10/10 of the ratings (seed 0) or per-user leave-last-1",
    )
    p.add_argument(
        "--protocol",
        choices=["random", "loo", "all"],
        default="random",
        help="quality: the Two-Tower bench on --split (random), temporal leave-one-out with a SASRec "
        "reference (loo), or both (all; what make bench-quality runs)",
    )
    p.add_argument(
        "--config",
        dest="ml100k_config",
        choices=["movielens_100k_recbole", "movielens_100k"],
        default="movielens_100k_recbole",
        help="quality: the shipped config to train (RecBole's files, or the original u.data layout written from them)",
    )

    p = add(
        sub,
        "chaos",
        _chaos,
        "inject faults into real runs here (preemption, full disk, damaged checkpoint, frozen peer, ...); "
        "one row each",
        config=False,
    )
    p.add_argument(
        "--only", action="append", default=[], metavar="NAME", help="run only this scenario (repeatable)"
    )
    p.add_argument("--keep", action="store_true", help="keep each scenario's temporary folder (logs)")
    p.add_argument(
        "--record",
        action="store_true",
        help="also write the printed table, with date, commit and machine load, to "
        "docs/benchmarks/results/chaos.txt (for docs/guides/reliability.md; make chaos passes it)",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `recsys` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    import os

    from recsys.console import quiet_libraries
    from recsys.errors import exit_status

    if args.verbose:
        os.environ["RECSYS_VERBOSE"] = "1"  # torchrun workers and launched jobs inherit it
    quiet_libraries()
    return exit_status(lambda: args.fn(args))


if __name__ == "__main__":
    sys.exit(main())

"""What the Kubeflow pipeline's steps do, as library functions the step bodies call in-process.

pipelines/recsys_pipeline.py ships thin component bodies (KFP runs them from source in the trainer
image); the work is here, importable and testable: the step's training config (the run's PVCs and
secrets go into the job section, so they reach the job pods), training through the launcher contract
(run id and failure reason as values), then index → batch recommend → scoring the recommendations.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.launch.types import JobResult

#: Job names stay within what `job_spec` accepts (the TrainJob's pod names add a prefix).
MAX_JOB_NAME = 40
BACKENDS = ("pytorchjob", "trainjob", "local")
#: Keys of the pipeline's object-store Secret passed to the job pods (TrainJobs need them by name).
OBJECT_STORE_SECRET_KEYS = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_REGION",
    "S3_ENDPOINT_URL",
    "MLFLOW_S3_ENDPOINT_URL",
]


def run_slug(pipeline_job_name: str, pipeline_task_id: str, room: int) -> tuple[str, str]:
    """(DNS-1123 slug of the pipeline run's name cut to `room`, 8-hex digest of run and task)."""
    digest = hashlib.sha1(f"{pipeline_job_name}/{pipeline_task_id}".encode()).hexdigest()[:8]
    slug = re.sub(r"[^a-z0-9]+", "-", pipeline_job_name.lower()).strip("-")[:room].strip("-")
    return slug, digest


def unique_job_name(base: str, pipeline_job_name: str, pipeline_task_id: str) -> str:
    """A job name unique per pipeline run and task (display names repeat across runs), ≤ 40 chars."""
    base = base[:14].strip("-")
    slug, digest = run_slug(pipeline_job_name, pipeline_task_id, MAX_JOB_NAME - len(base) - 8 - 2)
    return "-".join(p for p in (base, slug, digest) if p)


@dataclass(frozen=True)
class ClusterParams:
    """The pipeline run's parameters that shape the training job and its pods."""

    image: str
    nodes: int
    gpus_per_node: int
    procs_per_node: int
    node_selector: dict[str, str]
    tolerations: list[dict[str, Any]]
    mlflow_tracking_uri: str  # '' keeps the config's
    data_pvc: str
    checkpoint_pvc: str
    mlflow_secret: str
    object_store_secret: str
    object_store_keys: tuple[str, ...]


def train_config(
    config: str,
    overrides: list[str],
    prepared_dir: str,
    params: ClusterParams,
    pipeline_job_name: str,
    pipeline_task_id: str,
) -> Config:
    """The resolved training config of a pipeline step: the run's size, placement, PVCs and secrets in
    the job section (so the rendered job pods mount and read them), the user's overrides last."""
    from recsys.config import load_config

    sets = [
        f"data.prepared_dir={prepared_dir}",
        f"job.image={params.image}",
        f"job.nodes={params.nodes}",
        f"job.gpus_per_node={params.gpus_per_node}",
        f"job.procs_per_node={params.procs_per_node}",
        f"job.node_selector={json.dumps(params.node_selector)}",
        f"job.tolerations={json.dumps(params.tolerations)}",
        f"job.data_pvc={params.data_pvc}",
        f"job.checkpoint_pvc={params.checkpoint_pvc}",
        f"job.mlflow_secret={params.mlflow_secret}",
    ]
    if params.object_store_secret:
        keys = {params.object_store_secret: list(params.object_store_keys)}
        sets.append(f"job.extra_secrets={json.dumps(keys)}")
    if params.mlflow_tracking_uri:
        uri = params.mlflow_tracking_uri
        sets += [f"tracking.uri={uri}", f"job.mlflow_tracking_uri={uri}"]
    cfg = load_config(config, [*sets, *overrides])
    name = unique_job_name(cfg.job.name, pipeline_job_name, pipeline_task_id)
    return load_config(config, [*sets, *overrides, f"job.name={name}"])


def train_step(cfg: Config, backend: str, echo: Callable[[str], None] = print) -> JobResult:
    """Train `cfg` through the launcher contract, echoing the rank-0 log; the result when it succeeded,
    RuntimeError naming the job and the reason when it failed."""
    from recsys.launch.contract import submit

    if backend not in BACKENDS:
        raise UserError(f"backend: expected one of {', '.join(BACKENDS)}, got {backend!r}")
    handle = submit(cfg, backend)
    for line in handle.logs(follow=True):
        echo(line)
    result = handle.wait()
    if not result.succeeded:
        raise RuntimeError(f"training job {result.job_name} ({backend}) failed: {result.reason}")
    if result.run_id is None:
        raise RuntimeError(f"training job {result.job_name} ({backend}) succeeded but {result.reason}")
    return result


def index_step(run_id: str, tracking_uri: str | None, kind: str) -> dict[str, Any]:
    """Build and log the run's item index (`index/` artifacts); its facts (recall@k vs exact, seconds)."""
    from recsys.retrieval.index import IndexParams, build_run_index

    idx = build_run_index(run_id, tracking_uri or None, IndexParams(kind))
    return {k: v for k, v in idx.facts.items() if isinstance(v, (int, float, str))}


def recommendations_path(prepared_dir: str, run_id: str, k: int) -> str:
    """Where a run's batch recommendations go: beside its prepared data, on the data volume."""
    return str(Path(prepared_dir).parent / "recommendations" / f"{run_id}-top{k}.parquet")


def recommend_step(run_id: str, tracking_uri: str | None, k: int, out: str) -> dict[str, Any]:
    """Top-k unseen items for every user of the run, written as Parquet to `out`; the counts."""
    from recsys.retrieval.recommend import recommend

    rec = recommend(run_id, tracking_uri or None, "all", k, ("train",), out)
    return {"path": out, "rows": rec.table.num_rows, "users": rec.users, "fallback": rec.fallback,
            "index": rec.index}  # fmt: skip


def rank_step(
    ranker_config: str, overrides: list[str], run_id: str, tracking_uri: str | None, out_dir: str, top_n: int
) -> dict[str, Any]:
    """Retrieve → rank for Two-Tower run `run_id`: ranker data from its cross-fitted top-`top_n`
    (recsys.retrieval.candidates; the fold retrievers and the ranker train in this process, sized for
    ML-100K-like data), then retrieval alone vs re-ranked on test, logged to the run as funnel/test/…"""
    from recsys.config import load_config
    from recsys.retrieval.candidates import build_candidates
    from recsys.retrieval.funnel import evaluate_funnel
    from recsys.train import train

    sets = [*overrides, f"data.prepared_dir={out_dir}", f"data.candidates.top_n={top_n}"]
    if tracking_uri:
        sets.append(f"tracking.uri={tracking_uri}")
    cfg = load_config(ranker_config, sets)
    build_candidates(cfg, run_id, tracking_uri or None)
    ranker = train(cfg, resume="never").run_id
    if ranker is None:
        raise UserError(f"{ranker_config}: the ranker's training logged no MLflow run (tracking off?)")
    metrics = evaluate_funnel(run_id, ranker, tracking_uri or None, (top_n,), "test")
    return {"ranker_run_id": ranker, **metrics}


def score_recommendations(
    path: str, prepared_dir: str, ks: list[int], split: str = "test"
) -> dict[str, float]:
    """Recall@k, NDCG@k and HitRate@k of a recommendations Parquet against the positives of `split`
    (raw ids), averaged over the users that have any; every positive counts, rankable or not."""
    import numpy as np
    import pyarrow.parquet as pq

    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata, read_vocab

    meta = read_metadata(prepared_dir)
    uf, itf = meta.user_feature or "", meta.item_feature or ""
    users = read_vocab(prepared_dir, meta.sparse_features[meta.sparse_index(uf)])
    items = read_vocab(prepared_dir, meta.sparse_features[meta.sparse_index(itf)])
    arrays = read_split_arrays(prepared_dir, split, meta)
    pos = arrays["sparse"][arrays["label"] > 0]
    truth: dict[str, set[str]] = {}
    user_rows, item_rows = pos[:, meta.sparse_index(uf)], pos[:, meta.sparse_index(itf)]
    # Users unseen in training lost their raw ids to the OOV row (0): they cannot be matched to a list,
    # so they are counted apart. Items unseen in training stay targets nobody can hit (denominator).
    for n, (u, i) in enumerate(zip(user_rows, item_rows, strict=True)):
        if u:
            truth.setdefault(users[u], set()).add(items[i] if i else f"<unseen item {n}>")
    table = pq.read_table(path, columns=["user", "rank", "item"])
    table = table.sort_by([("user", "ascending"), ("rank", "ascending")])
    lists: dict[str, list[str]] = {}
    for u, i in zip(table["user"].to_pylist(), table["item"].to_pylist(), strict=True):
        lists.setdefault(u, []).append(i)
    out = {"users": float(len(truth)), "unmatched_positives": float((user_rows == 0).sum())}
    for k in ks:
        recall, ndcg, hit = [], [], []
        discounts = 1.0 / np.log2(np.arange(2, k + 2))
        for user, targets in truth.items():
            gains = np.array([x in targets for x in lists.get(user, [])[:k]], float)
            found = gains.sum()
            recall.append(found / len(targets))
            hit.append(float(found > 0))
            ideal = discounts[: min(len(targets), k)].sum()
            ndcg.append(float((gains * discounts[: len(gains)]).sum() / ideal))
        for name, vals in (("recall", recall), ("ndcg", ndcg), ("hit_rate", hit)):
            out[f"{name}_at_{k}"] = float(np.mean(vals)) if vals else 0.0
    return out

"""Distributed batch inference of `recsys recommend`: the same per-user code on four engines.

Every engine calls `Retriever.recommend(users, k)` (recsys.retrieval.recommend) on a subset of the
users; a user's rows do not depend on which other users share the call, so the engines agree row for row:

- torchrun (`recsys recommend --nproc N`, or `torchrun -m recsys recommend …`, or a pod of the rendered
  PyTorchJob/TrainJob): rank r of W takes the r-th contiguous slice of the user list (the run's
  embedding order, or the --users file's order) and writes `OUT/part-0000r-of-0000W.parquet`, via a
  temporary name and a rename, so a part that exists is complete. Rank 0 writes `OUT/manifest.json`
  (parts, rows, users, sha256, run id, k, exclude, index kind) once every rank is done. A re-run (a
  restarted pod) skips parts already written for the same job (the users file matched by content, not
  path); parts of another job are refused.
  The parts concatenated in order equal the single-process file.
- Spark (`recommend_spark`): `mapInPandas` over a DataFrame of users, one Retriever per Python worker.
- Ray Data (`recommend_ray`): `from_items(users).map_batches(...)` with one Retriever per actor.

The run is opened (MLflow) in every process that recommends: executors and actors need the tracking
server and the prepared folder reachable, as the pods do.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError

if TYPE_CHECKING:
    import pandas as pd
    import pyarrow as pa

    from recsys.config import Config
    from recsys.retrieval.recommend import Retriever

MANIFEST = "manifest.json"
#: Parquet schema-metadata key holding the job a part belongs to.
PART_KEY = b"recsys.batch"
#: The output columns, as Spark DDL (mapInPandas needs the schema up front).
SPARK_SCHEMA = "user string, rank int, item string, score float, fallback boolean"


@dataclass(frozen=True)
class BatchJob:
    """What a batch run computes; the same on every rank, task and actor."""

    run_id: str
    uri: str  # resolved tracking URI (workers must not guess it from their own cwd)
    users: str = "all"  # 'all' or a file of raw user ids
    k: int = 100
    exclude: tuple[str, ...] = ("train",)
    config: str | None = None
    overrides: tuple[str, ...] = ()

    def facts(self) -> dict[str, Any]:
        """What a part records about its job; parts match on MATCH_KEYS (the users file's content)."""
        return {
            "run_id": self.run_id,
            "users": self.users,
            "users_content": users_content(self.users),
            "k": self.k,
            "exclude": list(self.exclude),
        }


#: The facts that make two runs the same job: the users file by content (a pod may mount it at another
#: path; a file rewritten in place is another job), not by path.
MATCH_KEYS = ("run_id", "users_content", "k", "exclude", "world")


def users_content(users: str) -> str:
    """'all', or 'sha256:<hex>' of the users file's bytes."""
    if users == "all":
        return users
    try:
        return f"sha256:{_sha256(Path(users))}"
    except OSError as e:
        raise UserError(f"--users {users}: cannot read it ({e.strerror})") from None


def make_job(
    run_id: str,
    uri: str | None,
    users: str = "all",
    k: int = 100,
    exclude: tuple[str, ...] = ("train",),
    config: str | None = None,
    overrides: list[str] | None = None,
) -> BatchJob:
    """A BatchJob with k checked and the tracking URI resolved here (the driver's view)."""
    from recsys.retrieval.recommend import check_k
    from recsys.retrieval.runs import tracking_uri

    check_k(k)
    cfg = None
    if config is not None:
        from recsys.config import load_config

        cfg = load_config(config, overrides)
    return BatchJob(run_id, tracking_uri(uri, cfg), str(users), k, exclude, config, tuple(overrides or ()))


@functools.lru_cache(maxsize=2)
def retriever(job: BatchJob) -> Retriever:
    """The job's Retriever, opened once per process (Spark reuses its Python workers across tasks)."""
    from recsys.retrieval.recommend import open_retriever

    return open_retriever(job.run_id, job.uri, job.exclude, job.config, list(job.overrides))


def user_list(job: BatchJob, ret: Retriever | None = None) -> list[str]:
    """The job's users in order: the --users file's, or every user with an embedding (run order)."""
    from recsys.retrieval.recommend import read_users

    if job.users != "all":
        return read_users(job.users)
    if ret is not None:
        return ret.all_users()
    from recsys.retrieval.runs import open_run

    run = open_run(job.run_id, job.uri, job.config, list(job.overrides))
    return [str(u) for u in run.embeddings("user").ids]


def partition(n: int, parts: int, part: int) -> slice:
    """The `part`-th of `parts` contiguous, near-equal slices of n items (sizes differ by at most 1)."""
    return slice(n * part // parts, n * (part + 1) // parts)


# ------------------------------------------------------------------------------------------ torchrun
def part_path(out: str | Path, rank: int, world: int) -> Path:
    """`OUT/part-00000-of-00002.parquet`."""
    return Path(out) / f"part-{rank:05d}-of-{world:05d}.parquet"


def _part_facts(path: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return json.loads(meta.get(PART_KEY, b"{}"))


def part_done(path: Path, job: BatchJob, world: int) -> bool:
    """True when `path` is a complete part of this job; a part of another job is an error."""
    if not path.is_file():
        return False
    facts = _part_facts(path)
    want = {**job.facts(), "world": world}
    have = {key: facts.get(key) for key in MATCH_KEYS}
    if have != {key: want[key] for key in MATCH_KEYS}:
        raise UserError(
            f"{path}: a part of another batch job ({have}, users file {facts.get('users')!r}); "
            "write to another -o folder or delete that one"
        )
    return True


def write_part(table: pa.Table, path: Path, facts: dict[str, Any]) -> None:
    """Write `table` with `facts` in its schema metadata, atomically (temp name, then rename)."""
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**(table.schema.metadata or {}), PART_KEY: json.dumps(facts).encode()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    pq.write_table(table.replace_schema_metadata(meta), tmp)
    os.replace(tmp, path)  # atomic on POSIX: readers see no part or a whole one


def run_part(job: BatchJob, out: str | Path, rank: int, world: int) -> bool:
    """Compute and write this rank's part unless already written; True when it computed."""
    path = part_path(out, rank, world)
    if part_done(path, job, world):
        return False
    ret = retriever(job)
    users = user_list(job, ret)
    mine = users[partition(len(users), world, rank)]
    facts = {**job.facts(), "world": world, "index": ret.index.params.kind, "users_in_part": len(mine)}
    write_part(ret.recommend(mine, job.k), path, facts)
    return True


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(job: BatchJob, out: str | Path, world: int) -> dict[str, Any]:
    """Write `OUT/manifest.json` over the `world` parts (all must exist); returns it."""
    import pyarrow.parquet as pq

    parts = []
    for rank in range(world):
        path = part_path(out, rank, world)
        facts = _part_facts(path)
        rows = pq.ParquetFile(path).metadata.num_rows
        parts.append(
            {"file": path.name, "rows": rows, "users": facts["users_in_part"], "sha256": _sha256(path)}
        )
    manifest = {
        **job.facts(),
        "exclude": ",".join(job.exclude) or "none",
        "index": _part_facts(part_path(out, 0, world)).get("index"),
        "world": world,
        "rows": sum(p["rows"] for p in parts),
        "users_total": sum(p["users"] for p in parts),
        "parts": parts,
    }
    tmp = Path(out) / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, Path(out) / MANIFEST)
    return manifest


def recommend_ranks(job: BatchJob, out: str | Path) -> dict[str, Any] | None:
    """This process's share of a torchrun batch run; rank 0 returns the manifest, others None."""
    from recsys import distributed

    env = distributed.init_distributed("cpu")
    try:
        run_part(job, out, env.rank, env.world_size)
        distributed.barrier()  # every part is renamed into place before rank 0 lists them
        manifest = write_manifest(job, out, env.world_size) if env.is_main else None
        distributed.barrier()  # no rank exits (and no pod completes) before the manifest exists
        return manifest
    finally:
        distributed.cleanup()


def read_parts(out: str | Path) -> pa.Table:
    """The parts listed in `OUT/manifest.json`, concatenated in order (= the single-process table)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    manifest = json.loads((Path(out) / MANIFEST).read_text())
    tables = [pq.read_table(Path(out) / p["file"]) for p in manifest["parts"]]
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def recommend_argv(job: BatchJob, out: str) -> list[str]:
    """The `recommend` arguments that reproduce `job` writing to `out` (for torchrun and pods)."""
    argv = ["recommend", "--run-id", job.run_id, "--tracking-uri", job.uri, "--users", job.users]
    argv += ["--k", str(job.k), "--exclude", ",".join(job.exclude) or "none", "-o", out]
    if job.config is not None:
        argv += ["--config", job.config]
    for o in job.overrides:
        argv += ["--set", o]
    return argv


def launch_torchrun(job: BatchJob, out: str, nproc: int) -> int:
    """`torchrun --standalone --nproc-per-node N -m recsys recommend …` on this machine; its exit status."""
    import subprocess

    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    cmd += ["--nproc-per-node", str(nproc), "-m", "recsys", *recommend_argv(job, out)]
    print(f"recsys: {' '.join(cmd)}", file=sys.stderr)
    return subprocess.call(cmd)


# ------------------------------------------------------------------------------------ Spark and Ray
def _spark_batches(job: BatchJob, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
    """mapInPandas body: the users of each Arrow batch → their rows."""
    from recsys.retrieval.raw_ids import checked_ids

    ret = None
    for batch in batches:
        # A null user must not become the user "None"; checked first, so bad input fails before
        # the run is opened.
        users = checked_ids(batch["user"], "recommend_spark users, in a batch", "user")
        if ret is None:
            ret = retriever(job)
        yield ret.recommend(users, job.k).to_pandas()


def recommend_spark(
    job: BatchJob, spark: Any = None, users: Any = None, partitions: int | None = None
) -> Any:
    """The job on Spark: a DataFrame (user, rank, item, score, fallback) from `mapInPandas` over the
    users (a DataFrame with a string column `user`; default: the job's user list), lazily evaluated."""
    from recsys.launch.spark import get_spark

    spark = get_spark(spark)
    if users is None:
        import pandas as pd

        ids = user_list(job)
        users = spark.createDataFrame(pd.DataFrame({"user": ids}), "user string")
        users = users.repartition(partitions or spark.sparkContext.defaultParallelism)
    return users.select("user").mapInPandas(functools.partial(_spark_batches, job), SPARK_SCHEMA)


class RayRecommender:
    """Ray Data map_batches callable: one Retriever per actor, a batch of users → their rows."""

    def __init__(self, job: BatchJob) -> None:
        """Open the run in this actor."""
        self.job = job
        self.ret = retriever(job)

    def __call__(self, batch: pa.Table) -> pa.Table:
        """Rows of the users of `batch` (a pyarrow table with column `user`)."""
        from recsys.retrieval.raw_ids import checked_ids

        users = checked_ids(batch.column("user").to_pylist(), "recommend_ray users, in a batch", "user")
        return self.ret.recommend(users, self.job.k)


def recommend_ray(
    job: BatchJob, users: list[str] | None = None, actors: int = 2, batch_size: int = 4096
) -> Any:
    """The job on Ray Data: `from_items(users).map_batches(RayRecommender, …)`, a lazy Dataset.

    Uses the running Ray instance (ray.init / a cluster's), or starts a local one."""
    import ray

    from recsys.retrieval.raw_ids import checked_ids

    ids = user_list(job) if users is None else checked_ids(users, "recommend_ray users", "user")
    ds = ray.data.from_items([{"user": u} for u in ids])
    return ds.map_batches(
        RayRecommender,
        fn_constructor_args=(job,),
        batch_format="pyarrow",
        batch_size=batch_size,
        concurrency=actors,
    )


# ---------------------------------------------------------------------------------------- Kubernetes
def render_batch_job(
    cfg: Config, job: BatchJob, backend: str, out: str, name: str | None = None
) -> list[dict[str, Any]]:
    """ConfigMap + PyTorchJob/TrainJob running `torchrun -m recsys recommend … -o OUT` on cfg.job's size.

    `cfg` is the run's training config (the pods read its cluster-path twin from the ConfigMap, which
    points MLflow at the in-cluster server); `out` is a path in the pods (e.g. under /data). Validated.
    """
    from recsys.launch import kube
    from recsys.launch.elastic import TORCHRUN
    from recsys.launch.jobspec import CONFIG_PATH, job_spec
    from recsys.launch.kubeschema import validate_documents

    named = cfg.model_copy(deep=True)
    named.job.name = name or f"{cfg.job.name[:30]}-recommend"
    spec = job_spec(named)  # validates the name, size and env as for training
    pod_job = dataclasses.replace(job, uri=cfg.job.mlflow_tracking_uri, config=CONFIG_PATH, overrides=())
    argv = recommend_argv(pod_job, out)
    labels = {**spec.labels, "app.kubernetes.io/component": "batch-recommend"}
    spec = dataclasses.replace(spec, command=[*TORCHRUN, "-m", "recsys", *argv], labels=labels)
    if backend == "pytorchjob":
        docs = [kube.config_map(spec), kube.pytorchjob(spec)]
    elif backend == "trainjob":
        docs = [kube.config_map(spec), kube.trainjob(spec)]
    else:
        raise UserError(f"--render {backend!r}: expected pytorchjob or trainjob")
    validate_documents(docs, origin=f"batch recommend of run {job.run_id} ({backend})")
    return docs


def _run_config(job: BatchJob) -> Config:
    """The config to render with: --config (with --set) when given, else the run's own."""
    from recsys.config import load_config
    from recsys.retrieval.runs import open_run

    if job.config is not None:
        return load_config(job.config, list(job.overrides))
    return open_run(job.run_id, job.uri, None, list(job.overrides)).cfg


# ----------------------------------------------------------------------------------------------- CLI
def batch_main(args: Any) -> int:
    """`recsys recommend` with --render, --nproc, or under torchrun (WORLD_SIZE set)."""
    import time

    from recsys.retrieval.recommend import parse_exclude

    job = make_job(
        args.run_id,
        args.tracking_uri,
        args.users,
        args.k,
        parse_exclude(args.exclude),
        args.config,
        args.overrides,
    )
    if args.render:
        from recsys.launch.kube import to_yaml

        docs = render_batch_job(_run_config(job), job, args.render, args.output)
        sys.stdout.write(
            f"# batch recommend of run {job.run_id} ({args.render}); apply with kubectl apply -f\n---\n"
        )
        sys.stdout.write(to_yaml(docs))
        return 0
    if args.nproc is not None:
        return launch_torchrun(job, args.output, args.nproc)
    t0 = time.perf_counter()
    manifest = recommend_ranks(job, args.output)
    if manifest is not None:
        print(
            f"{manifest['rows']:,} recommendations for {manifest['users_total']:,} users in "
            f"{manifest['world']} parts -> {Path(args.output) / MANIFEST} in {time.perf_counter() - t0:.1f} s "
            f"(index: {manifest['index']})"
        )
    return 0

"""The flagship jobs resolve: tables sized from the data, and a sharding plan for the job's GPU topology.

manifests/dlrm-job.yaml trains DLRM on Criteo-layout data prepared by manifests/base/data-prep-job.yaml.
Here a tiny Criteo-layout TSV (written below, with known value counts) goes through that Job's own
`recsys data prepare` step (its config and --set overrides, only the file paths moved to tmp), and the
prepared tables must be what the min-count vocabulary makes of it. Then TorchRec's planner plans the
flagship model for the topology the committed PyTorchJob gets (Master + Workers × nprocPerNode, one GPU
per process, compute device cuda; planning needs no GPU) with Criteo-Kaggle-sized tables.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from recsys.config import Config, config_from_dict, load_config
from recsys.data.metadata import Metadata

REPO = Path(__file__).resolve().parents[1]
PREP_JOB = REPO / "manifests/base/data-prep-job.yaml"
NUM_DENSE, NUM_SPARSE = 13, 26
# Distinct raw values per categorical feature of the Criteo Kaggle train.txt (45.8M rows), as published
# with TorchRec's DLRM example (torchrec/datasets/criteo.py, DEFAULT_CAT_NAMES order).
CRITEO_KAGGLE_CARDINALITIES = [
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
]  # fmt: skip
SPLIT_TYPES = {"row_wise", "table_row_wise"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _prep_step(config_name: str) -> tuple[str, list[str]]:
    """(config, --set overrides) of the data-prep Job's step that prepares `config_name`."""
    pod = _docs(PREP_JOB)[0]["spec"]["template"]["spec"]
    for c in pod["initContainers"] + pod["containers"]:
        argv = c["command"]
        if argv[argv.index("--config") + 1] == config_name:
            return config_name, [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    raise AssertionError(f"{PREP_JOB} has no step preparing {config_name}")


def _job_config(path: str) -> Config:
    """The resolved config the job's pods read: the ConfigMap's config.yaml."""
    cm = next(d for d in _docs(REPO / path) if d["kind"] == "ConfigMap")
    return config_from_dict(yaml.safe_load(cm["data"]["config.yaml"]), origin=path)


def write_criteo_tsv(path: Path, rows: int, seed: int = 0) -> list[int]:
    """Criteo-layout rows (label, 13 ints, 26 hex ids; some fields empty) with known value counts.

    Feature j has k_j frequent values (each in ≥ 20 rows) and, in the other rows, ids seen once or twice
    or an empty field. Returns k_j per feature: with min_count 3 exactly these get a table row besides OOV,
    whichever rows the random split holds out.
    """
    rng = np.random.default_rng(seed)
    frequent_rows = rows * 3 // 4
    ks = [1 + (j * 5) % 11 for j in range(NUM_SPARSE)]  # 1 … 11 frequent values
    assert frequent_rows // max(ks) >= 20
    cols = []
    for j, k in enumerate(ks):
        frequent = [f"{(j << 24) + v * 7919:08x}" for v in range(k)]
        col = [frequent[i % k] for i in range(frequent_rows)]
        rare = [f"{(j << 24) + 0x800000 + i // 2:08x}" for i in range(rows - frequent_rows)]  # twice each
        rare = [("" if i % 10 == 0 else r) for i, r in enumerate(rare)]  # and some missing
        col += rare
        cols.append(list(rng.permutation(col)))
    with path.open("w") as f:
        for i in range(rows):
            label = int(rng.random() < 0.25)
            dense = ["" if rng.random() < 0.1 else str(int(rng.integers(0, 500))) for _ in range(NUM_DENSE)]
            f.write("\t".join([str(label), *dense, *(c[i] for c in cols)]) + "\n")
    return ks


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Config, Metadata, list[int]]:
    """The data-prep Job's criteo_kaggle step on a 600-row Criteo-layout TSV."""
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare

    tmp = tmp_path_factory.mktemp("flagship")
    raw = tmp / "raw/criteo/train.txt"  # /data/raw/criteo/train.txt on the data PVC
    raw.parent.mkdir(parents=True)
    ks = write_criteo_tsv(raw, rows=600)
    config, sets = _prep_step("criteo_kaggle")
    cfg = load_config(config, sets)
    assert cfg.data.source.paths == ["/data/raw/criteo/train.txt"]
    assert cfg.data == _job_config("manifests/dlrm-job.yaml").data, "the Job prepares what the job reads"
    cfg = load_config(config, [*sets, f"data.source.paths=[{raw}]", f"data.prepared_dir={tmp / 'prep'}"])
    prepare(cfg, overwrite=False)
    return cfg, read_metadata(cfg.data.prepared_dir), ks


def test_flagship_tables_are_sized_from_the_data_with_min_count(
    prepared: tuple[Config, Metadata, list[int]],
) -> None:
    cfg, meta, ks = prepared
    assert cfg.model.kind == "dlrm" and cfg.model.embedding_dim >= 64
    assert cfg.data.min_count >= 3, "ids seen once or twice must share the OOV row"
    assert len(meta.dense_features) == NUM_DENSE and len(meta.sparse_features) == NUM_SPARSE
    # One row per value seen ≥ min_count times in train, plus row 0 (OOV, missing, rare).
    assert [f.num_embeddings for f in meta.sparse_features] == [k + 1 for k in ks]
    assert sum(s.rows for s in meta.splits.values()) == 600

    from recsys.models.task import build_task

    tables = _tables(build_task(cfg, meta))
    assert [(t.num_embeddings, t.embedding_dim) for t in tables] == [
        (k + 1, cfg.model.embedding_dim) for k in ks
    ]


def _tables(model: torch.nn.Module) -> list[Any]:
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    return [
        c for m in model.modules() if isinstance(m, EmbeddingBagCollection) for c in m.embedding_bag_configs()
    ]


def _job_dist_env(path: str) -> Any:
    """The DistEnv rank 0 of a committed job has: what torchrun makes of the operator's env (WORLD_SIZE =
    pods × processes per pod, LOCAL_WORLD_SIZE = processes per pod), one GPU per process."""
    from recsys.distributed import DistEnv

    job = _docs(REPO / path)[-1]
    if job["kind"] == "PyTorchJob":
        replicas = job["spec"]["pytorchReplicaSpecs"]
        pods = sum(r["replicas"] for r in replicas.values())
        nproc = int(job["spec"]["nprocPerNode"])
        limits = [r["template"]["spec"]["containers"][0]["resources"]["limits"] for r in replicas.values()]
    else:
        trainer = job["spec"]["trainer"]
        pods, nproc = trainer["numNodes"], int(trainer["numProcPerNode"])
        limits = [trainer["resourcesPerNode"]["limits"]]
    assert all(int(lim["nvidia.com/gpu"]) == nproc for lim in limits), "one GPU per process"
    return DistEnv(0, 0, pods * nproc, nproc, torch.device("cuda"), "nccl")


def test_flagship_trainjob_twin_has_the_same_topology() -> None:
    pytorchjob, trainjob = (
        _job_dist_env("manifests/dlrm-job.yaml"),
        _job_dist_env("manifests/dlrm-trainjob.yaml"),
    )
    assert (pytorchjob.world_size, pytorchjob.local_world_size) == (
        trainjob.world_size,
        trainjob.local_world_size,
    )
    assert _job_config("manifests/dlrm-job.yaml") == _job_config("manifests/dlrm-trainjob.yaml")


def _plan(cfg: Config, meta: Metadata, env: Any) -> dict[str, tuple[str, list[int], int]]:
    """table → (sharding type, ranks, rows) as the job's planner plans it (no process group, no GPU needed)."""
    from torchrec.distributed.model_parallel import get_default_sharders

    from recsys.distributed import make_planner
    from recsys.models.task import build_task

    model = build_task(cfg, meta)  # tables on `meta`: planning reads shapes only
    rows = {t.name: t.num_embeddings for t in _tables(model)}
    plan = make_planner(cfg, env, list(rows)).plan(model, get_default_sharders())
    return {
        t: (ps.sharding_type, sorted(set(ps.ranks or [])), rows[t])
        for p in plan.plan.values()
        for t, ps in p.items()
    }


def test_flagship_plan_spreads_criteo_sized_tables_over_both_nodes(
    prepared: tuple[Config, Metadata, list[int]],
) -> None:
    path = "manifests/dlrm-job.yaml"
    cfg = _job_config(path)
    env = _job_dist_env(path)
    assert (env.world_size, env.local_world_size) == (
        cfg.job.nodes * cfg.job.gpus_per_node,
        cfg.job.gpus_per_node,
    )
    assert env.world_size >= 16 and cfg.job.nodes >= 2
    from recsys.distributed import _topology

    topo = _topology(env)
    assert (topo.world_size, topo.local_world_size, topo.compute_device) == (
        env.world_size,
        env.local_world_size,
        "cuda",
    )

    # The prepared features at Criteo Kaggle sizes (the tiny data's tables would all fit anywhere).
    _, meta, _ = prepared
    sized = [
        f.model_copy(update={"num_embeddings": n + 1})
        for f, n in zip(meta.sparse_features, CRITEO_KAGGLE_CARDINALITIES, strict=True)
    ]
    big = _plan(cfg, meta.model_copy(update={"sparse_features": sized}), env)
    print("\n".join(f"{t:<10} {rows:>9} {s:<15} ranks {r}" for t, (s, r, rows) in big.items()))
    # Every table table-wise or row-wise (never data-parallel): the fused sparse optimizer updates all.
    allowed = set(cfg.train.sharding.types or [])
    assert len(big) == NUM_SPARSE and allowed <= {"table_wise"} | SPLIT_TYPES
    assert {s for s, _, _ in big.values()} <= allowed
    # The five multi-million-row tables are spread: no two share a GPU.
    huge = [rs for _, rs, rows in big.values() if rows > 1_000_000]
    assert len(huge) == 5 and len({r for rs in huge for r in rs}) >= 5, big
    ranks = {r for _, rs, _ in big.values() for r in rs}
    assert min(ranks) < env.local_world_size <= max(ranks) < env.world_size, "both nodes hold tables"


def write_movielens_25m(folder: Path, users: int = 60, items: int = 40) -> None:
    """ratings.csv + movies.csv in ml-25m's layout: every user rates 6 movies (all ≥ 4 stars), and every
    movie is among some user's first 4 (the train part under leave-last-1 for val and test)."""
    folder.mkdir(parents=True)
    with (folder / "ratings.csv").open("w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        for u in range(users):
            for t in range(6):
                f.write(f"{u + 1},{(3 * u + t) % items + 1},{4.0 + (u + t) % 2},{1_000_000 + 100 * u + t}\n")
    genres = ["Action", "Comedy", "Drama", "Sci-Fi", "Thriller"]
    with (folder / "movies.csv").open("w") as f:
        f.write("movieId,title,genres\n")
        for i in range(items):
            f.write(f'{i + 1},"Movie {i}, The ({1990 + i % 7})",{genres[i % 5]}|{genres[(i + 2) % 5]}\n')


def test_two_tower_flagship_tables_are_sized_from_the_data(tmp_path: Path) -> None:
    """The data-prep Job's movielens_25m step on a tiny ml-25m-layout folder: one row per user and movie."""
    from recsys.data.prepare import prepare

    config, sets = _prep_step("movielens_25m")
    cfg = load_config(config, sets)
    assert cfg.data == _job_config("manifests/two-tower-job.yaml").data, "the Job prepares what the job reads"
    assert cfg.model.kind == "two_tower" and cfg.model.embedding_dim >= 64
    assert cfg.job.nodes >= 2 and cfg.job.gpus_per_node >= 1
    raw = tmp_path / "raw/ml-25m"
    write_movielens_25m(raw)
    local = [f"data.source.path={raw / 'ratings.csv'}", f"data.source.items={raw / 'movies.csv'}"]
    cfg = load_config(config, [*sets, *local, f"data.prepared_dir={tmp_path / 'prep'}"])
    meta = prepare(cfg, overwrite=False)
    rows = {f.name: f.num_embeddings for f in meta.sparse_features}
    assert (rows["user_id"], rows["item_id"], rows["year"]) == (60 + 1, 40 + 1, 7 + 1), rows
    assert {rows[f"genre_{k}"] for k in range(2)} == {5 + 1}, rows

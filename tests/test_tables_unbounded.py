"""Tables for unbounded id spaces: capped tables with a hashed tail, and managed-collision (MCH) tables.

The real prepare, trainer, torch.distributed.checkpoint and MLflow (a temp SQLite store) throughout.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from conftest import free_port

from recsys.config import ConfigError, load_config
from recsys.data import vocab as V
from recsys.errors import UserError

MC_ROWS = 40  # far fewer than cat_1's ~190 train ids: rows are evicted and reassigned
BASE = [
    "data.source.rows=6000",
    "data.source.num_sparse=3",
    "data.source.num_dense=3",
    "data.source.cardinality=200",
    "data.block_size=64",
    "model.embedding_dim=4",
    "model.dlrm.dense_arch_layers=[8,4]",
    "model.dlrm.over_arch_layers=[8,1]",
    "train.batch_size=256",
    "eval.batch_size=256",
    "train.epochs=2",
    "model.tables.cat_0.kind=capped",
    "model.tables.cat_0.max_rows=20",
    "model.tables.cat_0.hashed_rows=5",
    "model.tables.cat_1.kind=managed_collision",
    f"model.tables.cat_1.max_rows={MC_ROWS}",
]


def _hash(raw: str) -> int:
    """The documented id hash, written out here independently of recsys.data.hashing."""
    d = hashlib.blake2b(raw.encode("utf-8"), digest_size=8, person=b"recsys-id").digest()
    return int.from_bytes(d, "little") % ((1 << 63) - 1)


def _cfg(data: Path, tmp: Path, *sets: str):  # noqa: ANN202
    return load_config(
        "dlrm_synth",
        [*BASE, f"data.prepared_dir={data}", f"train.checkpoint.dir={tmp / 'ckpt'}", *sets],
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny CTR data prepared once with a capped cat_0 and a managed-collision cat_1."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("tables")
    prepare(_cfg(root / "data", root), overwrite=False)
    return root / "data"


# ------------------------------------------------------------------------------------------ capped
def _capped_table(ids: list[str | None], train: np.ndarray, spec: object) -> tuple[object, np.ndarray]:
    """The capped table prepare fixes from these ids' train counts, and each row's value."""
    from recsys.data.hashing import TableMap

    counter = V.IdCounter()
    enc = counter.add(pa.array(ids, pa.string()), train)
    table = TableMap(counter, 1, spec)  # type: ignore[arg-type]
    return table, table.rows_encoded(enc)


def test_capped_keeps_the_most_frequent_ids_and_hashes_the_rest_into_the_reserved_rows() -> None:
    from recsys.config import TableConfig

    ids = ["a"] * 5 + ["b"] * 3 + ["c", "d", None, "e"]
    train = np.array([True] * 11 + [False])  # "e" only outside train
    spec = TableConfig(kind="capped", max_rows=5, hashed_rows=2)
    fit, rows = _capped_table(ids, train, spec)
    expect = {"a": 1, "b": 2, **{x: 3 + _hash(x) % 2 for x in "cde"}}
    assert rows.tolist() == [expect[x] if x else 0 for x in ids]
    assert fit.ids.to_pylist() == ["a", "b", "<HASHED 0>", "<HASHED 1>"] and fit.num_embeddings == 5
    _, again = _capped_table(ids, train, spec)
    assert again.tolist() == rows.tolist()  # deterministic
    c = fit.collisions
    assert c is not None and c["train_ids"] == 4 and c["train_values"] == 10
    shared = [x for x in "cd" if sum(expect[y] == expect[x] for y in "cd") > 1]
    assert c["train_ids_in_shared_rows"] == len(shared) and c["train_values_in_shared_rows"] == len(shared)


def test_prepare_writes_capped_and_managed_collision_features(data: Path) -> None:
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata, read_vocab

    meta = read_metadata(data)
    capped, mc, exact = meta.sparse_features
    assert (capped.table, capped.num_embeddings, capped.hashed_rows) == ("capped", 20, 5)
    assert capped.id_hash and capped.collisions and capped.collisions["train_ids_in_shared_rows"] > 0
    assert (mc.table, mc.num_embeddings) == ("managed_collision", MC_ROWS) and exact.table == "exact"
    vocab = read_vocab(data, capped)
    assert len(vocab) == 20 and vocab[-5:] == [f"<HASHED {j}>" for j in range(5)]
    # The MC column holds the hashes of the raw ids (0 = missing), not vocabulary rows.
    test = read_split_arrays(data, "test", meta)["sparse"]
    known = {_hash(x) for x in read_vocab(data, mc)[1:]}
    values = set(np.unique(test[:, 1]).tolist()) - {0}
    assert values and max(values) > 1 << 40 and len(values & known) > len(values) // 2
    assert test[:, 0].max() < 20 and test[:, 0].min() >= 0


def test_unknown_and_mismatched_tables_are_named(data: Path, tmp_path: Path) -> None:
    from recsys.data.prepare import prepare
    from recsys.train import train

    cfg = _cfg(tmp_path / "d", tmp_path, "model.tables.nope.kind=exact")
    with pytest.raises(UserError, match=r"model\.tables\.nope: no sparse feature 'nope'"):
        prepare(cfg, overwrite=False)
    other = _cfg(data, tmp_path, "model.tables.cat_1.max_rows=50", "tracking.enabled=false")
    with pytest.raises(UserError, match=r"model\.tables\.cat_1: managed_collision table of 50 rows"):
        train(other, resume="never", allow_data_mismatch=True)
    with pytest.raises(ConfigError, match="max_rows: required for kind capped"):
        load_config("dlrm_synth", ["model.tables.x.kind=capped"])
    with pytest.raises(ConfigError, match="managed_collision .* is for model.kind dlrm only"):
        load_config(
            "two_tower_synth",
            ["model.table_default.kind=managed_collision", "model.table_default.max_rows=9"],
        )


# --------------------------------------------------------------------- train, checkpoint, resume
def _final_state(ckpt_root: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """The model tensors of the newest checkpoint of the run under ckpt_root (DCP → one torch file)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    steps = sorted(ckpt_root.glob("run-*/step-*[0-9]"))
    out = tmp / "state.pt"
    dcp_to_torch_save(steps[-1], out)
    state = torch.load(out, weights_only=False)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


@pytest.mark.slow
def test_train_checkpoint_resume_equals_the_uninterrupted_run_with_the_remapper_state(
    data: Path, tmp_path: Path
) -> None:
    from recsys.train import train

    # decay none: a run cut by max_steps then has the same LR schedule as the uninterrupted one.
    sets = [
        "train.checkpoint.every_steps=4",
        "tracking.enabled=false",
        "train.checkpoint.keep_last=9",
        "train.decay=none",
    ]
    ref = train(_cfg(data, tmp_path / "ref", *sets), resume="never")
    part = train(_cfg(data, tmp_path / "res", *sets, "train.max_steps=12"), resume="never")
    assert part.steps == 12 and ref.steps > 12
    (step12,) = (tmp_path / "res" / "ckpt").glob("run-*/step-00000012")
    full = train(_cfg(data, tmp_path / "res", *sets), resume=str(step12))
    assert full.resumed_from == 12 and full.steps == ref.steps
    assert full.metrics["auc"] == pytest.approx(ref.metrics["auc"], abs=1e-6)
    a = _final_state(tmp_path / "ref" / "ckpt", tmp_path / "ref")
    b = _final_state(tmp_path / "res" / "ckpt", tmp_path / "res")
    mch = [k for k in a if "remapper.mch.cat_1." in k]
    names = {k.rsplit(".", 1)[1] for k in mch}
    assert {
        "_mch_sorted_raw_ids",
        "_mch_remapped_ids_mapping",
        "_mch_counts",
        "_current_iter_tensor",
    } <= names
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if k in mch else torch.allclose(a[k], b[k], atol=1e-6), k
    held = a[next(k for k in mch if k.endswith("_mch_sorted_raw_ids"))]
    assert (held != torch.iinfo(torch.int64).max).sum() == MC_ROWS - 2  # every row but the miss row used
    assert int(a[next(k for k in mch if k.endswith("_current_iter_tensor"))]) == ref.steps


@pytest.mark.slow
def test_export_gives_embeddings_per_raw_id_and_labels_shared_rows(data: Path, tmp_path: Path) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from recsys.data.metadata import read_metadata, read_vocab
    from recsys.evaluate import evaluate_run
    from recsys.train import train

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = _cfg(data, tmp_path, f"tracking.uri={uri}", "tracking.experiment=tables")
    res = train(cfg, resume="never")
    # The logged model carries the remapper's state: evaluated on its own, it gives the run's test AUC.
    again = evaluate_run(cfg, res.run_id or "")
    assert again["test/auc"] == pytest.approx(res.metrics["auc"], abs=1e-5)
    client = mlflow.MlflowClient(uri)
    meta = read_metadata(data)
    tables = {}
    for name in ("cat_0", "cat_1"):
        path = client.download_artifacts(res.run_id, f"embeddings/{name}.parquet", str(tmp_path))
        tables[name] = pq.read_table(path).to_pydict()
    capped, mc = tables["cat_0"], tables["cat_1"]
    assert capped["id"] == read_vocab(data, meta.sparse_features[0])[1:]
    assert [r >= 15 for r in capped["row"]] == capped["shared"] and sum(capped["shared"]) == 5
    ids = read_vocab(data, meta.sparse_features[1])[1:]
    assert mc["id"] == ids and len(ids) > MC_ROWS
    rows = np.array(mc["row"])
    held = rows[~np.array(mc["shared"])]
    assert len(held) == len(set(held.tolist())) == MC_ROWS - 2  # one id per held row
    assert (rows[np.array(mc["shared"])] == MC_ROWS - 1).all()  # the rest share the miss row
    assert len(mc["embedding"][0]) == 4


# ------------------------------------------------------------------------------- two gloo ranks
DUMP = r"""
import os, sys, torch
from recsys import trainer as T
orig = T.Trainer.fit
def fit(self, ckpt):
    out = orig(self, ckpt)
    state = {k: v for k, v in self.model.state_dict().items() if "remapper" in k}
    torch.save(state, sys.argv[1] + f"/remapper-r{os.environ['RANK']}.pt")
    return out
T.Trainer.fit = fit
from recsys.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
@pytest.mark.dist
def test_two_gloo_ranks_train_and_their_remappers_agree(data: Path, tmp_path: Path) -> None:
    cfg_sets = [*BASE, f"data.prepared_dir={data}", f"train.checkpoint.dir={tmp_path / 'ckpt'}"]
    (tmp_path / "dump.py").write_text(DUMP)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
        f"--master_port={free_port()}", str(tmp_path / "dump.py"), str(tmp_path),
        "train", "--config", "dlrm_synth", "--resume", "never", "--set", "tracking.enabled=false",
        *[a for s in cfg_sets for a in ("--set", s)],
    ]  # fmt: skip
    root = str(Path(__file__).resolve().parents[1])  # this checkout, also under another cwd
    path = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"remapper-r{r}.pt") for r in (0, 1))
    assert r0.keys() == r1.keys() and any("_mch_sorted_raw_ids" in k for k in r0)
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k


def test_spark_prepare_refuses_non_exact_tables_instead_of_writing_exact_ones(tmp_path: Path) -> None:
    pytest.importorskip("pyspark")
    from recsys.data.spark_mds import prepare_dataframe

    src = f"data.source={{kind: table, path: {tmp_path / 'x.csv'}, label: y, dense: [a], sparse: [b]}}"
    cfg = load_config("dlrm_synth", [src, "model.tables.b.kind=capped", "model.tables.b.max_rows=9"])
    with pytest.raises(UserError, match="model.tables: capped and managed_collision tables are prepared by"):
        prepare_dataframe(None, cfg)  # type: ignore[arg-type]  # refused before the DataFrame is read

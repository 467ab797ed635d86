"""Warm start (train.init_from / --init-from): the real trainer on tiny data prepared here.

Two prepared folders with overlapping ids: v2 has more users and another generator seed, so its
vocabularies put most known ids on other rows than v1 (a copy by row number would fail) and add new
ids. The child's state is taken right before its first step (Trainer.fit wrapped by the test) and
compared, by raw id, with the parent's checkpoint (known rows), with a fresh run's state (new rows)
and with the parent's dense layers and optimizer state.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import TINY_TWO_TOWER, free_port

from recsys.config import Config, dump_config, load_config
from recsys.data.metadata import read_vocab_file
from recsys.errors import UserError

TINY = [*TINY_TWO_TOWER, "train.epochs=1", "tracking.log_model=false"]  # DATA sets each version's users
DATA = {"v1": ["data.source.num_users=40"], "v2": ["data.source.num_users=50", "data.source.seed=1"]}
FEATURES = ("user_id", "item_id")


def _table(f: str) -> str:
    return f"model.ebc.embedding_bags.t_{f}.weight"


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """v1 and v2 prepared once for the module."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("warm")
    for name, sets in DATA.items():
        prepare(_cfg(root, name, None, *sets), overwrite=False)
    return root


def _cfg(root: Path, data: str, uri: str | None, *sets: str) -> Config:
    tracking = [f"tracking.uri={uri}", "tracking.experiment=test-warm"] if uri else ["tracking.enabled=false"]
    return load_config(
        "two_tower_synth",
        [
            *TINY,
            *DATA[data],
            f"data.prepared_dir={root / data}",
            f"train.checkpoint.dir={root / 'ckpt' / data}",
            *tracking,
            *sets,
        ],
    )


@pytest.fixture(scope="module")
def parent(root: Path) -> dict[str, Any]:
    """A 1-rank parent trained on v1, tracked in a SQLite store: its run id, checkpoint, store."""
    from recsys.train import train

    uri = f"sqlite:///{root / 'mlflow.db'}"
    result = train(_cfg(root, "v1", uri, "tracking.run_name=parent"), resume="never")
    (step,) = sorted((root / "ckpt" / "v1").glob("run-*/step-*"))[-1:]
    return {"run_id": result.run_id, "checkpoint": step, "uri": uri}


class _Stop(Exception):
    """Raised by the wrapped fit once the state before the first step is taken."""


def _state_before_training(monkeypatch: pytest.MonkeyPatch, cfg: Config) -> dict[str, torch.Tensor]:
    """Run `recsys train`'s code in this process up to the first step; model + optimizer state then."""
    from recsys import trainer as T
    from recsys.distributed import gather_state_dict
    from recsys.train import train

    taken: dict[str, torch.Tensor] = {}

    def fit(self: Any, ckpt: Any) -> float:
        taken.update(gather_state_dict(self.model, self.env) or {})
        taken["provenance"] = self.provenance  # type: ignore[assignment]
        for param, per in self.optimizer.state_dict()["state"].items():
            for name, t in per.items():
                local = t.local_shards()[0].tensor if hasattr(t, "local_shards") else t
                taken[f"optim.{param}.{name}"] = local.detach().clone()
        raise _Stop

    monkeypatch.setattr(T.Trainer, "fit", fit)
    with pytest.raises(_Stop):
        train(cfg, resume="never")
    monkeypatch.undo()
    return taken


def _parent_tensor(checkpoint: Path, key: str) -> torch.Tensor:
    """One whole tensor of a checkpoint, in its own dtype."""
    from torch.distributed.checkpoint import FileSystemReader

    from recsys.warm_start import read_tensor

    md = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata[key]
    return read_tensor(checkpoint, key, tuple(md.size), md.properties.dtype)


def _assert_rows(
    root: Path, child: dict[str, torch.Tensor], fresh: dict[str, torch.Tensor], checkpoint: Path
) -> None:
    """Known ids: the parent's rows, bit for bit; new ids: the fresh run's rows; some of each, and moved."""
    for f in FEATURES:
        old_ids = {v: i for i, v in enumerate(read_vocab_file(root / "v1" / "vocab" / f"{f}.txt"))}
        new_ids = read_vocab_file(root / "v2" / "vocab" / f"{f}.txt")
        old = _parent_tensor(checkpoint, f"model.{_table(f)}")
        known = [(k, old_ids[v]) for k, v in enumerate(new_ids) if v in old_ids]
        new = [k for k, v in enumerate(new_ids) if v not in old_ids]
        assert sum(1 for k, o in known if k != o) > len(known) // 2, f"{f}: most known ids should move"
        got = child[_table(f)]
        for k, o in known:
            assert torch.equal(got[k], old[o]), f"{f}: row {k} ({new_ids[k]}) is not the parent's row {o}"
        assert torch.equal(got[new], fresh[_table(f)][new]), f"{f}: new rows differ from a fresh init"
        assert new or f == "item_id", f"{f}: v2 should bring new ids"  # v2 adds users, not items


def test_known_rows_copied_new_rows_fresh_dense_and_optimizer_loaded(
    root: Path, parent: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    run_dir = parent["checkpoint"].parent
    child = _state_before_training(monkeypatch, _cfg(root, "v2", None, f"train.init_from={run_dir}"))
    fresh = _state_before_training(monkeypatch, _cfg(root, "v2", None))
    ckpt = Path(child["provenance"]["init_from"])  # type: ignore[index]
    assert ckpt == parent["checkpoint"]
    _assert_rows(root, child, fresh, ckpt)
    dense = [k for k in child if "_mlp." in k and not k.startswith("optim.")]
    assert dense
    for k in dense:
        assert torch.equal(child[k], _parent_tensor(ckpt, f"model.{k}")), k
        assert not torch.equal(child[k], fresh[k]), k
        for s in ("exp_avg", "exp_avg_sq"):  # Adam's state of the dense layers is carried
            assert torch.equal(child[f"optim.{k}.{s}"], _parent_tensor(ckpt, f"optim.state.{k}.{s}")), (k, s)
    # Row-wise Adagrad: a copied row keeps its accumulated state, a new row starts at zero as fresh.
    old_ids = {v: i for i, v in enumerate(read_vocab_file(root / "v1" / "vocab/user_id.txt"))}
    new_ids = read_vocab_file(root / "v2" / "vocab/user_id.txt")
    mom = f"optim.{_table('user_id')}.t_user_id.momentum1"
    old_mom = _parent_tensor(ckpt, f"optim.state.{_table('user_id')}.t_user_id.momentum1")
    assert old_mom.abs().sum() > 0
    for k, v in enumerate(new_ids):
        want = old_mom[old_ids[v]] if v in old_ids else fresh[mom][k]
        assert torch.equal(child[mom][k], want), (k, v)


def test_run_id_warm_start_records_parent_and_lineage(root: Path, parent: dict[str, Any]) -> None:
    import mlflow

    from recsys.train import train

    uri = parent["uri"]
    child = train(
        _cfg(
            root,
            "v2",
            uri,
            f"train.init_from={parent['run_id']}",
            "train.max_steps=2",
            "tracking.run_name=child",
        ),
        resume="never",
    )
    client = mlflow.MlflowClient(uri)
    tags = client.get_run(child.run_id).data.tags
    assert tags["recsys.parent_run_id"] == parent["run_id"]
    assert tags["recsys.init_from"] == str(parent["checkpoint"])
    v1, v2 = str((root / "v1").resolve()), str((root / "v2").resolve())
    assert json.loads(tags["recsys.data_lineage"]) == [v1, v2]
    local = mlflow.artifacts.download_artifacts(
        run_id=child.run_id, artifact_path="warm_start.txt", tracking_uri=uri
    )
    text = Path(local).read_text()
    assert "rows copied by id" in text and "reset:" in text
    # A grandchild back on v1 inherits the whole chain (ancestors first, each folder once).
    grand = train(
        _cfg(
            root, "v1", uri, f"train.init_from={child.run_id}", "train.max_steps=2", "tracking.run_name=grand"
        ),
        resume="never",
    )
    gtags = client.get_run(grand.run_id).data.tags
    assert gtags["recsys.parent_run_id"] == child.run_id
    assert json.loads(gtags["recsys.data_lineage"]) == [v1, v2]
    (gstep,) = sorted((root / "ckpt" / "v1").glob("run-*/step-*"))[-1:]
    assert json.loads((gstep / "recsys.json").read_text())["provenance"]["parent_run_id"] == child.run_id


def test_mismatches_are_clear_errors(root: Path, parent: dict[str, Any], tmp_path: Path) -> None:
    from recsys.train import train

    step = parent["checkpoint"]
    with pytest.raises(UserError, match=r"t_user_id\.weight has embedding_dim 8 there and 16 here"):
        train(_cfg(root, "v2", None, f"train.init_from={step}", "model.embedding_dim=16"), resume="never")
    with pytest.raises(
        UserError,
        match=r"model\.(user|item)_mlp\.0\.(weight|bias) is \[16.*\] there and \[32.*\] in this model",
    ):
        train(
            _cfg(root, "v2", None, f"train.init_from={step}", "model.two_tower.layers=[32,8]"), resume="never"
        )
    with pytest.raises(UserError, match="neither a checkpoint folder nor a run in MLflow"):
        train(_cfg(root, "v2", parent["uri"], "train.init_from=0123456789abcdef"), resume="never")
    # The parent's data folder prepared again since: its vocabularies may not be the checkpoint's.
    moved = tmp_path / "run" / step.name
    shutil.copytree(step, moved)
    meta = json.loads((moved / "recsys.json").read_text())
    meta["provenance"]["metadata_sha256"] = "0" * 64
    (moved / "recsys.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="prepared again after this checkpoint"):
        train(_cfg(root, "v2", None, f"train.init_from={moved}"), resume="never")


# ------------------------------------------------------------------------------ across world sizes
WRAPPER = """
import os, sys, torch
from recsys import trainer as T
from recsys.distributed import gather_state_dict

def fit(self, ckpt):
    state = gather_state_dict(self.model, self.env)
    if self.env.is_main:
        torch.save(state, sys.argv[1])
    sys.exit(0)

T.Trainer.fit = fit
from recsys.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _torchrun(cfg: Config, tmp: Path, *args: str, dump: Path | None = None) -> str:
    """`recsys train` on 2 gloo ranks; with `dump`, the state before the first step is saved there."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "cfg.yaml").write_text(dump_config(cfg))
    (tmp / "wrapper.py").write_text(WRAPPER)
    entry = [str(tmp / "wrapper.py"), str(dump)] if dump else ["-m", "recsys"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        *entry, "train", "--config", str(tmp / "cfg.yaml"), "--resume", "never", *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


@pytest.mark.slow
@pytest.mark.dist
def test_warm_start_across_world_sizes(
    root: Path, parent: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """2 → 1: a 2-rank parent (its MLflow run id) warm-starts a 1-rank run. 1 → 2: the 1-rank parent's
    checkpoint warm-starts a 2-rank run whose tables are split column-wise over both ranks."""
    uri = parent["uri"]
    _torchrun(
        _cfg(
            root,
            "v1",
            uri,
            "tracking.run_name=parent2",
            f"train.checkpoint.dir={tmp_path / 'p2'}",
            "train.max_steps=3",
        ),
        tmp_path / "p2",
    )
    import mlflow

    (run,) = mlflow.MlflowClient(uri).search_runs(
        [mlflow.MlflowClient(uri).get_experiment_by_name("test-warm").experiment_id],
        "attributes.run_name = 'parent2'",
    )
    assert run.data.tags["world_size"] == "2"
    child = _state_before_training(monkeypatch, _cfg(root, "v2", uri, f"train.init_from={run.info.run_id}"))
    fresh = _state_before_training(monkeypatch, _cfg(root, "v2", None))
    _assert_rows(root, child, fresh, Path(child["provenance"]["init_from"]))  # type: ignore[index]

    cw = ["train.sharding.types=[column_wise]", "train.sharding.min_partition=4"]
    log = _torchrun(
        _cfg(root, "v2", None, *cw, f"train.init_from={parent['checkpoint']}"),
        tmp_path / "c2",
        dump=tmp_path / "c2.pt",
    )
    assert "column_wise" in log and "rows copied by id" in log, log[-3000:]
    assert "momentum1 replicated into 2 column shards" in log and "layout differs" not in log, log[-3000:]
    _torchrun(_cfg(root, "v2", None, *cw), tmp_path / "f2", dump=tmp_path / "f2.pt")
    child2 = torch.load(tmp_path / "c2.pt", weights_only=True)
    fresh2 = torch.load(tmp_path / "f2.pt", weights_only=True)
    _assert_rows(root, child2, fresh2, parent["checkpoint"])
    for k in (k for k in child2 if "_mlp." in k):
        assert torch.equal(child2[k], _parent_tensor(parent["checkpoint"], f"model.{k}")), k


# ---------------------------------------------------------------------- capped and managed-collision
TABLES = [
    "data.source.rows=3000",
    "data.source.num_sparse=3",
    "data.source.num_dense=3",
    "data.source.cardinality=200",
    "data.block_size=64",
    "model.embedding_dim=4",
    "model.dlrm.dense_arch_layers=[8,4]",
    "model.dlrm.over_arch_layers=[8,1]",
    "train.batch_size=256",
    "eval.batch_size=256",
    "train.max_steps=4",
    "tracking.enabled=false",
    "model.tables.cat_0.kind=capped",
    "model.tables.cat_0.max_rows=20",
    "model.tables.cat_0.hashed_rows=5",
    "model.tables.cat_1.kind=managed_collision",
    "model.tables.cat_1.max_rows=40",
]


def _dlrm(root: Path, name: str, *sets: str) -> Config:
    return load_config(
        "dlrm_synth",
        [*TABLES, f"data.prepared_dir={root / name}", f"train.checkpoint.dir={root / 'ckpt' / name}", *sets],
    )


@pytest.mark.slow
def test_capped_and_managed_collision_tables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Capped: the frequent part by id, the hashed block as a block; managed collision: the table and
    the remapper's state whole; exact: by id. A DLRM on two CTR folders of 3000 and 4500 rows (the counts, so the vocabulary order, differ)."""
    from recsys.data.prepare import prepare
    from recsys.train import train

    a, b = _dlrm(tmp_path, "a"), _dlrm(tmp_path, "b", "data.source.rows=4500")
    prepare(a, overwrite=False)
    prepare(b, overwrite=False)
    train(a, resume="never")
    (step,) = sorted((tmp_path / "ckpt" / "a").glob("run-*/step-*"))[-1:]
    child = _state_before_training(
        monkeypatch, _dlrm(tmp_path, "b", "data.source.rows=4500", f"train.init_from={step}")
    )
    fresh = _state_before_training(monkeypatch, _dlrm(tmp_path, "b", "data.source.rows=4500"))
    emb = "model.model.sparse_arch.embedding_bag_collection.embedding_bags.t_{}.weight"
    for f, known_rows in (("cat_0", range(15)), ("cat_2", None)):
        old_ids = {v: i for i, v in enumerate(read_vocab_file(tmp_path / "a" / "vocab" / f"{f}.txt"))}
        new_ids = read_vocab_file(tmp_path / "b" / "vocab" / f"{f}.txt")
        old, got, new = (
            _parent_tensor(step, emb.format(f)),
            child[emb.format(f)[6:]],
            fresh[emb.format(f)[6:]],
        )
        rows = known_rows or range(len(new_ids))
        moved = fresh_rows = 0
        for k in rows:
            v = new_ids[k]
            known = v in old_ids and not v.startswith("<")
            want = old[old_ids[v]] if known else new[k]
            moved += known and old_ids[v] != k
            fresh_rows += not known
            assert torch.equal(got[k], want if k else old[0]), (f, k, v)
        assert moved and fresh_rows, (f, moved, fresh_rows)
    # The capped table's hashed block (rows 15..19): the same hash and size, so copied as a block.
    assert torch.equal(child[emb.format("cat_0")[6:]][15:], _parent_tensor(step, emb.format("cat_0"))[15:])
    mc = [k for k in child if "remapper.mch.cat_1." in k or k == emb.format("cat_1")[6:]]
    assert any("_mch_sorted_raw_ids" in k for k in mc)
    for k in mc:
        assert torch.equal(child[k], _parent_tensor(step, f"model.{k}").to(child[k].dtype)), k


def test_a_managed_collision_table_of_another_size_is_refused(tmp_path: Path) -> None:
    from recsys.data.hashing import HASH_NAME
    from recsys.data.metadata import Metadata, SparseFeature
    from recsys.warm_start import _row_map

    def meta(rows: int) -> Metadata:
        f = SparseFeature(
            name="cat_1",
            num_embeddings=rows,
            vocab_file="vocab/cat_1.txt",
            table="managed_collision",
            id_hash=HASH_NAME,
        )
        return Metadata(
            name="t", kind="ctr", block_size=1, dense_features=[], sparse_features=[f], splits={}, sources=[]
        )

    cfg = load_config("dlrm_synth", [f"data.prepared_dir={tmp_path}"])
    rows, note = _row_map(cfg, meta(40), tmp_path, meta(40), "cat_1")
    assert rows is not None and rows.tolist() == list(range(40)) and "remapper copied" in note
    with pytest.raises(
        UserError, match=r"model\.tables\.cat_1: a managed-collision table .* 40 rows; now: .* 50"
    ):
        _row_map(cfg, meta(40), tmp_path, meta(50), "cat_1")

"""Warm start (`recsys train --init-from RUN_ID|CHECKPOINT_DIR`, train.init_from): a new run begins from
a previous run's weights instead of random ones.

Rows are matched by raw id, never by row number: vocab/<feature>.txt line k is the raw id of row k in
both the parent's data and the new data, so a row of an id the parent knew is copied bit-identically
into whatever row the new vocabulary gives that id (appended vocabularies and re-sorted ones alike).
Rows of new ids keep the values the Trainer initialised them with, which are a fresh run's (the same
seed, nothing random drawn before). Dense layers (MLPs, towers, the managed-collision remapper's
buffers) are loaded when every shape matches; optimizer state follows the rows where the optimizer
is the same (per-row state of copied rows, the dense optimizer's state); counters, LR schedule, early
stopping, loader position and RNG start fresh. `warm_start` returns the lines saying all of it.

The parent's state is read with torch.distributed.checkpoint into plain tensors, one table at a time
(memory: the largest table of the parent and its optimizer state, on every rank), so a checkpoint
written by any number of ranks warm-starts a job of any size.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    import torch

    from recsys.checkpoint import CheckpointInfo
    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.trainer import Trainer

PARENT_TAG = "recsys.parent_run_id"
INIT_FROM_TAG = "recsys.init_from"
LINEAGE_TAG = "recsys.data_lineage"
CHECKPOINT_DIR_TAG = "recsys.checkpoint_dir"
_SPECIAL = ("<UNUSED>",)  # vocabulary lines that name no id (capped tables' unfilled rows)


@dataclass
class Parent:
    """The run a warm start begins from: its checkpoint, data description and row maps."""

    checkpoint: Path
    run_id: str | None
    fingerprint: dict[str, Any]
    lineage: list[str]
    #: feature → int64 [new rows]: the parent's row of each new row (-1: a new id, keeps its fresh init)
    row_maps: dict[str, np.ndarray] = field(default_factory=dict)
    #: feature → what happened to it (kind, copied rows, new rows)
    notes: dict[str, str] = field(default_factory=dict)


# ------------------------------------------------------------------------------------- provenance
def metadata_sha256(prepared_dir: str | Path) -> str:
    """sha256 of a prepared folder's metadata.json (it changes whenever the folder is prepared again)."""
    from recsys.data.metadata import metadata_path

    return hashlib.sha256(metadata_path(prepared_dir).read_bytes()).hexdigest()


def own_lineage(cfg: Config, meta: Metadata, ancestors: list[str]) -> list[str]:
    """The prepared folders this run and its ancestors trained on, oldest first, each once: the
    parent's, then data.train_dirs, then data.prepared_dir. (A window's metadata lineage is its
    vocabulary chain, which may hold folders no run trained on, so it is not used here.)"""
    seen = list(ancestors)
    seen += [str(Path(d).resolve()) for d in cfg.data.train_dirs]
    seen.append(str(Path(cfg.data.prepared_dir).resolve()))
    return list(dict.fromkeys(seen))


def provenance(cfg: Config, meta: Metadata, parent: Parent | None) -> dict[str, Any]:
    """What a checkpoint records about where it comes from (recsys.json "provenance")."""
    return {
        "prepared_dir": str(Path(cfg.data.prepared_dir).resolve()),
        "metadata_sha256": metadata_sha256(cfg.data.prepared_dir),
        "parent_run_id": parent.run_id if parent else None,
        "init_from": str(parent.checkpoint) if parent else None,
        "lineage": own_lineage(cfg, meta, parent.lineage if parent else []),
    }


def provenance_tags(prov: dict[str, Any]) -> dict[str, str]:
    """MLflow tags of a run's provenance: parent run, the checkpoint it began from, data lineage."""
    tags = {LINEAGE_TAG: json.dumps(prov["lineage"])}
    if prov.get("parent_run_id"):
        tags[PARENT_TAG] = str(prov["parent_run_id"])
    if prov.get("init_from"):
        tags[INIT_FROM_TAG] = str(prov["init_from"])
    if len(tags[LINEAGE_TAG]) > 8000:  # MLflow's tag limit: the whole list is in lineage.json
        tags[LINEAGE_TAG] = json.dumps(prov["lineage"][-20:])[:7900] + " … (all: lineage.json)"
    return tags


# ------------------------------------------------------------------------------ finding the parent
def _pick_checkpoint(run_dir: Path, best_step: int | None, what: str) -> CheckpointInfo:
    """The best checkpoint of a run folder when it still exists, else its newest complete one."""
    from recsys.checkpoint import complete_checkpoints

    done = complete_checkpoints(run_dir)
    if not done:
        raise UserError(f"--init-from {what}: no complete checkpoint in {run_dir}")
    if best_step is None:
        best_step = (done[-1].meta.get("best") or {}).get("step")
    best = [c for c in done if c.step == best_step]
    return best[0] if best else done[-1]


def _checkpoint_of_path(path: Path) -> CheckpointInfo:
    from recsys.checkpoint import checkpoint_problem, complete_checkpoints

    if (path / ".metadata").exists() or (path / "recsys.json").exists():
        found = [c for c in complete_checkpoints(path.parent) if c.path == path]
        if not found:
            raise UserError(f"--init-from {path}: not a complete checkpoint: {checkpoint_problem(path)}")
        return found[0]
    return _pick_checkpoint(path, None, str(path))


def _parent_from_checkpoint(path: Path) -> tuple[CheckpointInfo, Path, str | None]:
    """(checkpoint, folder holding its metadata.json and vocab/, MLflow run id) of a checkpoint path."""
    info = _checkpoint_of_path(path)
    prov = info.meta.get("provenance") or {}
    data = prov.get("prepared_dir")
    if not data:
        raise UserError(
            f"--init-from {info.path}: the checkpoint does not record the prepared folder it was trained on "
            "(written before warm start existed); pass its MLflow run id instead"
        )
    if not Path(data, "metadata.json").is_file():
        raise UserError(
            f"--init-from {info.path}: its prepared folder {data} is gone; pass its MLflow run id"
        )
    if metadata_sha256(data) != prov.get("metadata_sha256"):
        raise UserError(
            f"--init-from {info.path}: {data} was prepared again after this checkpoint was written, so its "
            "vocabularies may not be the ones the checkpoint's rows follow; pass the run's MLflow run id "
            "(its logged vocabularies are the right ones)"
        )
    return info, Path(data), info.meta.get("run_id")


def _parent_from_run(cfg: Config, run_id: str, tmp: Path) -> tuple[CheckpointInfo, Path, str | None]:
    """(checkpoint, downloaded metadata.json + vocab/, run id) of an MLflow run of ours."""
    import mlflow

    from recsys.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    client = mlflow.MlflowClient(uri)
    try:
        run = client.get_run(run_id)
    except Exception as e:
        raise UserError(
            f"--init-from {run_id}: neither a checkpoint folder nor a run in MLflow at {uri} "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None
    ckpt_dir = run.data.tags.get(CHECKPOINT_DIR_TAG)
    if not ckpt_dir:
        raise UserError(
            f"--init-from {run_id}: the run has no {CHECKPOINT_DIR_TAG} tag (trained before warm start "
            "existed); pass its checkpoint folder instead"
        )
    if not Path(ckpt_dir).is_dir():
        raise UserError(f"--init-from {run_id}: its checkpoint folder {ckpt_dir} is not reachable from here")
    best = run.data.tags.get("best_step")
    info = _pick_checkpoint(Path(ckpt_dir), int(best) if best else None, run_id)
    # The run's own vocabularies: the prepared folder may have been prepared again since.
    for artifact in ("vocab", "data/metadata.json"):
        try:
            got = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=artifact, dst_path=str(tmp), tracking_uri=uri
            )
        except Exception as e:
            raise UserError(
                f"--init-from {run_id}: the run has no {artifact} artifact ({type(e).__name__}); pass its "
                "checkpoint folder instead"
            ) from None
    (tmp / "metadata.json").write_bytes(Path(got).read_bytes())  # vocab/ is at tmp/vocab already
    return info, tmp, run_id


def find_parent(cfg: Config, meta: Metadata, init_from: str) -> Parent:
    """Rank 0: the parent of `init_from` (a checkpoint or run folder, or an MLflow run id) and the
    row maps from its vocabularies to `meta`'s."""
    from recsys.data.metadata import read_metadata

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(init_from)
        if path.exists():
            info, data_dir, run_id = _parent_from_checkpoint(path)
        else:
            info, data_dir, run_id = _parent_from_run(cfg, init_from, Path(tmp))
        old = read_metadata(data_dir)
        parent = Parent(
            checkpoint=info.path,
            run_id=run_id,
            fingerprint=info.meta.get("fingerprint", {}),
            lineage=list((info.meta.get("provenance") or {}).get("lineage") or []),
        )
        for f in meta.sparse_features:
            rows, note = _row_map(cfg, old, data_dir, meta, f.name)
            if rows is not None:
                parent.row_maps[f.name] = rows
            parent.notes[f.name] = note
    return parent


# ---------------------------------------------------------------------------------------- row maps
def _row_map(
    cfg: Config, old: Metadata, old_dir: Path, new: Metadata, name: str
) -> tuple[np.ndarray | None, str]:
    """(parent row of each new row, -1 for new ids; or None: the whole table is fresh) and a note."""
    from recsys.data.vocab import Vocab, row_mapping

    nf = new.sparse_features[new.sparse_index(name)]
    of = next((f for f in old.sparse_features if f.name == name), None)
    if of is None:
        return None, f"{name}: not in the parent's data: the whole table is fresh"
    if nf.table == "managed_collision" or of.table == "managed_collision":
        same = (of.table, of.num_embeddings, of.id_hash) == (nf.table, nf.num_embeddings, nf.id_hash)
        if not same:
            raise UserError(
                f"model.tables.{name}: a managed-collision table warm-starts only from the same kind and "
                f"size (parent: {of.table}, {of.num_embeddings} rows; now: {nf.table}, {nf.num_embeddings}); "
                "its rows belong to whatever ids the remapper assigned them"
            )
        return np.arange(
            nf.num_embeddings, dtype=np.int64
        ), f"{name}: managed collision: table and remapper copied"
    old_ids = _vocab_ids(old_dir, of)
    new_ids = _vocab_ids(Path(cfg.data.prepared_dir), nf)
    rows = row_mapping(Vocab(old_ids[1:]), Vocab(new_ids[1:]), missing=-1)  # row 0 (OOV) stays 0
    rows[np.isin(new_ids, _SPECIAL)] = -1  # unfilled rows of a capped table name no id
    note = ""
    if nf.table == "capped":
        hashed_new = np.arange(nf.num_embeddings - nf.hashed_rows, nf.num_embeddings)
        if (of.table, of.hashed_rows, of.id_hash) == ("capped", nf.hashed_rows, nf.id_hash):
            rows[hashed_new] = np.arange(of.num_embeddings - of.hashed_rows, of.num_embeddings)
            note = f"; the {nf.hashed_rows} hashed rows copied as a block"
        else:
            rows[hashed_new] = -1
            note = f"; the {nf.hashed_rows} hashed rows are fresh (the parent hashed differently)"
    copied = int((rows >= 0).sum())
    return (
        rows,
        f"{name}: {copied} of {nf.num_embeddings} rows copied by id, {nf.num_embeddings - copied} fresh{note}",
    )


def _vocab_ids(prepared_dir: Path, feature: Any) -> list[str]:
    """Raw ids by row of a prepared folder's vocabulary (row 0: the OOV token)."""
    from recsys.data.metadata import read_vocab

    return read_vocab(prepared_dir, feature)


# ----------------------------------------------------------------------------------- applying it
def _parts(t: Any) -> list[tuple[torch.Tensor, int, int]]:
    """(local tensor, first row, first column) of each piece of `t` this rank holds."""
    import torch
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    if isinstance(t, ShardedTensor):
        out = []
        for s in t.local_shards():
            off = list(s.metadata.shard_offsets) + [0]
            out.append((s.tensor, int(off[0]), int(off[1]) if s.tensor.dim() > 1 else 0))
        return out
    if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):  # a data-parallel (replicated) table
        return [(t, 0, 0)]
    raise UserError(
        f"warm start cannot copy rows into a {type(t).__name__} yet (use table- or column-wise sharding)"
    )


def _copy_rows(dst: Any, old: torch.Tensor, rows: np.ndarray) -> None:
    """dst[r] = old[rows[r]] for every row r this rank holds whose rows[r] >= 0 (columns as sharded)."""
    import torch

    with torch.no_grad():
        for local, r0, c0 in _parts(dst):
            src = torch.from_numpy(rows[r0 : r0 + local.shape[0]])
            keep = (src >= 0).nonzero().squeeze(1)
            picked = old[src[keep]]
            if local.dim() > 1:
                picked = picked[:, c0 : c0 + local.shape[1]]
            local[keep.to(local.device)] = picked.to(local.device, local.dtype)


def checkpoint_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DCP checkpoint (flattened key) and its global shape."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k: tuple(v.size) for k, v in md.items() if hasattr(v, "size")}


def read_tensor(path: Path, key: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The whole tensor `key` of a checkpoint, however many ranks wrote it; collective in a job."""
    import torch

    from recsys.checkpoint import load_checkpoint

    out = {key: torch.empty(shape, dtype=dtype)}
    load_checkpoint(path, out)
    return out[key]


def _size(t: Any) -> tuple[int, ...]:
    return tuple(t.size())


def warm_start(trainer: Trainer, parent: Parent) -> list[str]:
    """Load `parent` into a freshly built trainer (collective); the lines saying what was carried."""
    from recsys.models.two_tower import table_name

    cfg, meta = trainer.cfg, trainer.meta
    t0 = time.perf_counter()
    shapes = checkpoint_shapes(parent.checkpoint)
    old = parent.fingerprint
    same_sparse = old.get("train.sparse_optimizer.name") == cfg.train.sparse_optimizer.name
    same_dense = old.get("train.dense_optimizer.name") == cfg.train.dense_optimizer.name
    if same_dense:
        _create_dense_state(trainer)
    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict()}
    tables = {
        k: f.name
        for f in meta.sparse_features
        for k in state["model"]
        if k.endswith(f"embedding_bags.{table_name(f.name)}.weight")
    }
    missing = [f.name for f in meta.sparse_features if f.name not in tables.values()]
    if missing:  # e.g. the item table a history model shares through an EmbeddingCollection
        raise UserError(
            f"train.init_from: no EmbeddingBagCollection table for {', '.join(missing)} in this model "
            f"({cfg.model.kind}); warm start copies EmbeddingBagCollection tables only, so it is not "
            "available for models reading data.history yet: train from scratch (drop train.init_from)"
        )
    lines = [
        f"recsys: warm start from {parent.checkpoint}" + (f" (run {parent.run_id})" if parent.run_id else "")
    ]
    carried = []
    for key, feature in tables.items():  # first: a wrong embedding_dim is named as such
        carried += _load_table(parent, state, key, feature, shapes, same_sparse)
    dense = _load_dense(parent, state, tables, shapes, same_dense)
    trainer.model.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optim"])
    lines += [f"  table {parent.notes[f]}" for f in tables.values()]
    lines.append(f"  dense: {dense} tensors loaded (every shape matches)")
    sparse_opt = (
        f"state of copied rows follows them, new rows start fresh ({'; '.join(carried) or 'no state'})"
        if same_sparse
        else f"reset ({old.get('train.sparse_optimizer.name')} → {cfg.train.sparse_optimizer.name})"
    )
    dense_opt = (
        "state carried"
        if same_dense
        else (f"reset ({old.get('train.dense_optimizer.name')} → {cfg.train.dense_optimizer.name})")
    )
    lines.append(f"  sparse optimizer ({cfg.train.sparse_optimizer.name}): {sparse_opt}")
    lines.append(f"  dense optimizer ({cfg.train.dense_optimizer.name}): {dense_opt}")
    lines.append("  reset: step and epoch counters, LR schedule, best value and early stopping, loader, RNG")
    lines.append(f"  loaded in {time.perf_counter() - t0:.1f} s")
    return lines


def _create_dense_state(trainer: Trainer) -> None:
    """The dense optimizer's state exists only after a step: create it so DCP can load into it."""
    from torchrec.optim.keyed import KeyedOptimizerWrapper

    for _, opt in trainer.optimizer.optimizers:
        if isinstance(opt, KeyedOptimizerWrapper) and not any(opt.state.values()):
            opt.init_state()


def _load_dense(
    parent: Parent,
    state: dict[str, Any],
    tables: dict[str, str],
    shapes: dict[str, tuple[int, ...]],
    optim: bool,
) -> int:
    """Load every non-table tensor of the model (and, with `optim`, their optimizer state) in place."""
    from recsys.checkpoint import load_checkpoint

    want: dict[str, Any] = {}
    for k, t in state["model"].items():
        if k in tables:
            continue
        key = f"model.{k}"
        if key not in shapes:
            raise UserError(
                f"--init-from {parent.checkpoint}: the parent has no {k}: the model differs; start fresh"
            )
        if shapes[key] != _size(t):
            raise UserError(
                f"--init-from {parent.checkpoint}: {k} is {list(shapes[key])} there and {list(_size(t))} in "
                "this model (model.* settings differ); warm start needs the same dense layers"
            )
        want[key] = t
    if optim:
        for k, per in state["optim"]["state"].items():
            if k in tables:  # per-row state: follows the rows in _load_table
                continue
            for name, t in per.items():
                key = f"optim.state.{k}.{name}"
                if key in shapes and shapes[key] == _size(t):
                    want[key] = t
    if want:
        load_checkpoint(parent.checkpoint, want)
    return sum(1 for k in want if k.startswith("model."))


def _load_table(
    parent: Parent,
    state: dict[str, Any],
    key: str,
    feature: str,
    shapes: dict[str, tuple[int, ...]],
    optim: bool,
) -> list[str]:
    """Copy the parent's rows of one table (and its per-row optimizer state) by the feature's row map;
    returns one line per optimizer state tensor of the table saying how it was carried."""
    rows = parent.row_maps.get(feature)
    old_key = f"model.{key}"
    if old_key not in shapes and rows is not None:
        parent.notes[feature] = f"{feature}: the parent's model has no such table: the whole table is fresh"
        rows = None
    if rows is None:
        return []
    dst = state["model"][key]
    old_shape, new_shape = shapes[old_key], _size(dst)
    if old_shape[1:] != new_shape[1:]:
        raise UserError(
            f"--init-from {parent.checkpoint}: {key} has embedding_dim {old_shape[1]} there and {new_shape[1]} "
            "here (model.embedding_dim differs); warm start needs the same embedding_dim"
        )
    _copy_rows(dst, read_tensor(parent.checkpoint, old_key, old_shape, dst.dtype), rows)
    said = []
    for name, t in (state["optim"]["state"].get(key) or {}).items():
        okey = f"optim.state.{key}.{name}"
        how = (
            _carry_state(parent.checkpoint, okey, shapes.get(okey), t, old_shape[0], rows) if optim else None
        )
        said.append(f"{name} {how}" if how else f"{name} reset (layout differs)")
    return said


def _carry_state(
    checkpoint: Path, key: str, old_shape: tuple[int, ...] | None, t: Any, old_rows: int, rows: np.ndarray
) -> str | None:
    """Copy one table's optimizer state by the row map; how it was carried, or None (left fresh).

    Per-row state of a column-wise table is one block of rows per column shard (TorchRec lays
    row-wise Adagrad's accumulator out as [rows × shards]); blocks are matched one to one, averaged
    into one (exact for equal-width shards) or one is replicated into each (an estimate)."""
    new_rows = len(rows)
    shape = _size(t)
    if old_shape is None or old_shape[1:] != shape[1:] or old_shape[0] % old_rows or shape[0] % new_rows:
        return None
    ob, nb = old_shape[0] // old_rows, shape[0] // new_rows
    old = read_tensor(checkpoint, key, old_shape, t.dtype).view(ob, old_rows, *old_shape[1:])
    if ob == nb:
        how = "carried"
    elif ob == 1:
        old, how = old.expand(nb, *old.shape[1:]), f"replicated into {nb} column shards (an estimate)"
    elif nb == 1:
        old, how = old.mean(0, keepdim=True), f"averaged over {ob} column shards"
    else:
        return None
    blocks = [np.where(rows >= 0, rows + b * old_rows, -1) for b in range(nb)]
    _copy_rows(t, old.reshape(nb * old_rows, *old_shape[1:]), np.concatenate(blocks))
    return how

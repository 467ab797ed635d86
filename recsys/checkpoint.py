"""Checkpoints of the Trainer with torch.distributed.checkpoint (DCP): complete or invisible.

Layout under the checkpoint root (train.checkpoint.dir; one root per job)::

    <root>/run-20261130-071500-3fa2/     one training run (a fresh start makes a new one)
        run.json                        {"run_id": MLflow run id, "finished": false, ...}
        step-00000120/                  a complete checkpoint: DCP files, .metadata, recsys.json
        step-00000140.tmp/              being written, or torn by a crash: never loaded

A checkpoint is written into `step-N.tmp/` and renamed to `step-N/` by rank 0 only after DCP has
finished on every rank (DCP's coordinator writes `.metadata` after gathering every rank's write
results), so a reader sees either a whole checkpoint or none. `recsys.json` (counters, loader state,
best value, MLflow run id, the config fingerprint) is inside the renamed folder.

Resume (`recsys train --resume auto|never|PATH`): `auto` continues the newest run folder that is not
finished, from its newest complete checkpoint; `never` starts a new run folder; a PATH names a
checkpoint or a run folder. Rank 0 decides and broadcasts, so every rank loads the same step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.distributed import DistEnv

RUN_FILE = "run.json"
META_FILE = "recsys.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class CheckpointInfo:
    """A complete checkpoint on disk."""

    path: Path
    step: int
    meta: dict[str, Any]


def default_root(cfg: Config) -> Path:
    """Checkpoint root of `cfg`: train.checkpoint.dir, else runs/checkpoints/<name> under the cwd."""
    if cfg.train.checkpoint.dir:
        return Path(cfg.train.checkpoint.dir)
    return Path.cwd() / "runs" / "checkpoints" / cfg.name


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run folder, oldest first (torn and .tmp folders left out)."""
    out = []
    if not run_dir.is_dir():
        return out
    for p in run_dir.iterdir():
        m = _STEP_RE.match(p.name)
        if not (m and p.is_dir() and (p / ".metadata").is_file() and (p / META_FILE).is_file()):
            continue
        try:
            meta = json.loads((p / META_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out.append(CheckpointInfo(p, int(m.group(1)), meta))
    return sorted(out, key=lambda c: c.step)


def _read_run(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _new_run_dir(root: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    return root / f"run-{stamp}-{uuid.uuid4().hex[:4]}"


def resolve_resume(root: Path, resume: str) -> tuple[Path, CheckpointInfo | None]:
    """(run folder to write into, checkpoint to load or None) for `--resume`; call on rank 0 only."""
    if resume == "never":
        return _new_run_dir(root), None
    if resume != "auto":
        path = Path(resume)
        if (path / ".metadata").is_file() and _STEP_RE.match(path.name):
            found = [c for c in complete_checkpoints(path.parent) if c.path == path]
            if not found:
                raise UserError(f"--resume {resume}: not a complete checkpoint (no {META_FILE}; torn?)")
            return path.parent, found[0]
        done = complete_checkpoints(path)
        if not done:
            raise UserError(
                f"--resume {resume}: no complete checkpoint there (expected a step-NNNNNNNN folder or a "
                "run folder holding them); use --resume never to start fresh"
            )
        return path, done[-1]
    runs = sorted(p for p in root.glob("run-*") if p.is_dir()) if root.is_dir() else []
    for run_dir in reversed(runs):
        if _read_run(run_dir).get("finished"):
            break  # the newest run finished: a new start
        done = complete_checkpoints(run_dir)
        return run_dir, (done[-1] if done else None)
    return _new_run_dir(root), None


def fingerprint(cfg: Config, num_embeddings: dict[str, int]) -> dict[str, Any]:
    """What a checkpoint must agree on with the config that loads it (model shape, data, vocabularies)."""
    from recsys.data.metadata import data_settings

    model = cfg.model.model_dump(mode="json")
    # Only the chosen family's section shapes the state (a DLRM ignores model.two_tower).
    model.pop("dlrm" if cfg.model.kind == "two_tower" else "two_tower")
    return {
        "model": model,
        "data": data_settings(cfg),
        "vocab": dict(num_embeddings),
        "train.batch_size": cfg.train.batch_size,
        "train.dense_optimizer.name": cfg.train.dense_optimizer.name,
        "train.sparse_optimizer.name": cfg.train.sparse_optimizer.name,
    }


class Checkpointer:
    """Saves and loads the Trainer's state dict in one run folder; prunes; marks the run finished."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, best_mode: str) -> None:
        import torch.distributed as dist

        self.cfg = cfg.train.checkpoint
        self.keep_best = self.cfg.keep_best or (
            cfg.train.early_stopping.metric is not None and cfg.train.early_stopping.restore_best
        )
        self.env = env
        self.run_dir = run_dir
        self.best_mode = best_mode
        self._pending: Any = None
        self._lock = threading.Lock()
        self.blocked_seconds = 0.0
        self.saves = 0
        # A group of its own: a background save's collectives must not interleave with training's.
        self._group = dist.new_group(backend="gloo") if self.cfg.async_save and env.world_size > 1 else None

    # ------------------------------------------------------------------------------------- run file
    def start_run(self, run_id: str | None) -> None:
        """Rank 0: create the run folder and record the MLflow run id; remove torn checkpoints."""
        if not self.env.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for torn in self.run_dir.glob("step-*.tmp"):
            print(f"recsys: removing torn checkpoint {torn}", flush=True)
            shutil.rmtree(torn, ignore_errors=True)
        info = _read_run(self.run_dir)
        info.update({"run_id": run_id, "finished": False, "world_size": self.env.world_size})
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json(self.run_dir / RUN_FILE, info)

    def mark_finished(self) -> None:
        """Rank 0: the run ended normally; `--resume auto` will start a new run next time."""
        self.wait()
        if self.env.is_main:
            info = _read_run(self.run_dir)
            info["finished"] = True
            _write_json(self.run_dir / RUN_FILE, info)

    # ---------------------------------------------------------------------------------------- save
    def save(self, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Write `state` (DCP) + `meta` (recsys.json) as step-<meta['step']>; collective on every rank.

        The previous background save is finished first. With async_save the call returns once the
        state is staged (copied); the folder becomes visible when the write completes.
        """
        import torch.distributed.checkpoint as dcp

        t0 = time.perf_counter()
        self.wait()
        step = int(meta["step"])
        final = self.run_dir / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            if final.exists():  # re-saving a step (e.g. best and epoch end coincide): keep the first
                self.blocked_seconds += time.perf_counter() - t0
                return
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_json(tmp / META_FILE, meta)
        from recsys.distributed import barrier, broadcast_object

        if broadcast_object(final.exists()):
            self.blocked_seconds += time.perf_counter() - t0
            return
        barrier()  # the folder exists before any rank writes into it
        if self.cfg.async_save:
            fut = dcp.async_save(
                state, checkpoint_id=str(tmp), process_group=self._group, async_stager=_copy_stager()
            )
            fut = fut.upload_completion if hasattr(fut, "upload_completion") else fut
            # Rank 0's future completes after every rank's write (its coordinator writes .metadata
            # last), so the folder is published as soon as the data is safe, not at the next save.
            fut.add_done_callback(lambda f, tmp=tmp: f.exception() is None and self._commit(tmp))
            self._pending = (fut, tmp)
        else:
            dcp.save(state, checkpoint_id=str(tmp))
            self._commit(tmp)
        self.saves += 1
        self.blocked_seconds += time.perf_counter() - t0

    def wait(self) -> None:
        """Finish a background save and commit it (every rank waits for its own part)."""
        if self._pending is None:
            return
        (fut, tmp), self._pending = self._pending, None
        fut.result()  # raises what the background write raised
        self._commit(tmp)  # the callback may still be running: _commit is idempotent under a lock

    def _commit(self, tmp: Path) -> None:
        if not self.env.is_main:
            return
        with self._lock:
            if not tmp.exists():
                return
            os.replace(tmp, tmp.with_name(tmp.name.removesuffix(".tmp")))
            _fsync_dir(self.run_dir)
            self.prune()

    def prune(self) -> None:
        """Rank 0: delete complete checkpoints beyond keep_last, sparing the best one."""
        if not self.env.is_main:
            return
        done = complete_checkpoints(self.run_dir)
        if not done:
            return
        keep = {c.step for c in done[-self.cfg.keep_last :]}
        best_step = (done[-1].meta.get("best") or {}).get("step")
        if self.keep_best and best_step is not None:
            keep.add(int(best_step))
        for c in done:
            if c.step not in keep:
                shutil.rmtree(c.path, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- load
    def load(self, info: CheckpointInfo, state: dict[str, Any]) -> None:
        """Load checkpoint `info` into `state` in place (resharding as needed); collective."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        dcp.load(state, checkpoint_id=str(info.path))

    def find(self, step: int) -> CheckpointInfo | None:
        """The complete checkpoint of `step` in this run folder, if it is still there."""
        self.wait()
        for c in complete_checkpoints(self.run_dir):
            if c.step == step:
                return c
        return None


def staged_copy(obj: Any) -> Any:
    """A copy of a state dict that training may keep mutating while the copy is written.

    DCP's default stager cannot copy TorchRec's ShardedTensors (it calls data_ptr on them), so each
    local shard is cloned and wrapped again with the same global metadata.
    """
    import torch
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor

    if isinstance(obj, ShardedTensor):
        shards = [Shard(s.tensor.detach().clone(), s.metadata) for s in obj.local_shards()]
        return ShardedTensor._init_from_local_shards_and_global_metadata(
            shards, obj.metadata(), process_group=obj._process_group
        )
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: staged_copy(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [staged_copy(v) for v in obj]
    return obj


def _copy_stager() -> Any:
    """An AsyncStager that stages with staged_copy, synchronously (the copy is the blocking part)."""
    from torch.distributed.checkpoint.staging import AsyncStager

    class CopyStager(AsyncStager):
        _synchronize_after_execute = False

        def stage(self, state_dict: Any) -> Any:
            return staged_copy(state_dict)

        def synchronize_staging(self) -> None:
            return None

        def close(self) -> None:
            return None

    return CopyStager()


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    """Write JSON atomically (temp file + rename): a crash leaves the old file or the new one."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

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

Durability: `recsys.json` lists every file of the checkpoint with its size when it is committed, so a
truncated shard makes the checkpoint incomplete (resume falls back to the previous one and says so).
Resuming an older step retires the later checkpoints of the abandoned trajectory into `retired/`;
pruning renames a folder aside before deleting it; JSON markers are fsynced (file and folder). Loading
unpickles nothing but plain values (torch.load with weights_only=True).
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
RETIRED_DIR = "retired"
_STEP_RE = re.compile(r"^step-(\d{8})$")
_DELETING = ".deleting"
_FULL_BYTES = 1 << 20  # a volume with less free space than this after a failed write is "full"


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


def checkpoint_problem(path: Path) -> str | None:
    """Why the step folder `path` is not a complete checkpoint (None when it is)."""
    if not (path / ".metadata").is_file():
        return "no .metadata (the write did not finish)"
    try:
        meta = json.loads((path / META_FILE).read_text())
    except OSError:
        return f"no {META_FILE}"
    except json.JSONDecodeError as e:
        return f"{META_FILE} is not valid JSON ({e})"
    # Checkpoints written before the size list existed are taken as they are.
    for name, size in (meta.get("files") or {}).items():
        try:
            got = (path / name).stat().st_size
        except OSError:
            return f"{name} is missing"
        if got != size:
            return f"{name} has {got} bytes, {size} were written (truncated or overwritten)"
    return None


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step-NNNNNNNN folder of a run, complete or not, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [(_STEP_RE.match(p.name), p) for p in run_dir.iterdir() if p.is_dir()]
    return sorted((int(m.group(1)), p) for m, p in found if m)


def complete_checkpoints(run_dir: Path) -> list[CheckpointInfo]:
    """The complete checkpoints of a run folder, oldest first (torn, damaged and .tmp folders left out)."""
    out = []
    for step, p in _step_folders(run_dir):
        if checkpoint_problem(p) is None:
            out.append(CheckpointInfo(p, step, json.loads((p / META_FILE).read_text())))
    return out


def _newest_complete(run_dir: Path) -> CheckpointInfo | None:
    """The newest complete checkpoint; says which newer step folders were passed over and why."""
    done = complete_checkpoints(run_dir)
    newest = done[-1].step if done else -1
    for step, p in _step_folders(run_dir):
        if step > newest:
            problem = checkpoint_problem(p)
            fallback = f"step {newest}" if done else "the start (no complete checkpoint)"
            print(f"recsys: checkpoint {p} is damaged: {problem}; resuming from {fallback}", flush=True)
    return done[-1] if done else None


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
                raise UserError(f"--resume {resume}: not a complete checkpoint: {checkpoint_problem(path)}")
            return path.parent, found[0]
        newest = _newest_complete(path)
        if newest is None:
            raise UserError(
                f"--resume {resume}: no complete checkpoint there (expected a step-NNNNNNNN folder or a "
                "run folder holding them); use --resume never to start fresh"
            )
        return path, newest
    runs = sorted(p for p in root.glob("run-*") if p.is_dir()) if root.is_dir() else []
    for run_dir in reversed(runs):
        if _read_run(run_dir).get("finished"):
            break  # the newest run finished: a new start
        return run_dir, _newest_complete(run_dir)
    return _new_run_dir(root), None


def fingerprint(cfg: Config, num_embeddings: dict[str, int]) -> dict[str, Any]:
    """What a checkpoint must agree on with the config that loads it (model shape, data, vocabularies)."""
    from recsys.data.metadata import data_settings

    model = cfg.model.model_dump(mode="json")
    # Only the chosen family's section shapes the state (a DLRM ignores model.two_tower).
    for family in ("dlrm", "two_tower", "sequential"):
        if family != cfg.model.kind:
            model.pop(family, None)
    if model.get("two_tower", {}).get("history_pooling") == "none":  # as checkpoints before the field
        model["two_tower"].pop("history_pooling")
    out = {
        "model": model,
        "data": data_settings(cfg),
        "vocab": dict(num_embeddings),
        "train.batch_size": cfg.train.batch_size,
        "train.dense_optimizer.name": cfg.train.dense_optimizer.name,
        "train.sparse_optimizer.name": cfg.train.sparse_optimizer.name,
    }
    if cfg.data.train_dirs:  # resuming over other window folders would replay another epoch's data
        out["data.train_dirs"] = sorted(str(Path(d).resolve()) for d in cfg.data.train_dirs)
    return out


class Checkpointer:
    """Saves and loads the Trainer's state dict in one run folder; prunes; marks the run finished."""

    def __init__(self, cfg: Config, env: DistEnv, run_dir: Path, best_mode: str) -> None:
        from recsys.distributed import control_group

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
        self.saves = 0  # saves started (a failed one is counted in failed_saves too)
        self.failed_saves = 0
        self._failure: tuple[int, str] | None = None  # rank 0: a failed commit, told at the next save
        # A group of its own: a background save's collectives must not interleave with training's.
        self._group = control_group() if self.cfg.async_save else None

    # ------------------------------------------------------------------------------------- run file
    def start_run(self, run_id: str | None, resumed_step: int | None = None) -> None:
        """Rank 0: create the run folder and record the MLflow run id; remove torn checkpoints.

        Step folders after `resumed_step` (a rollback with --resume PATH, or damaged ones passed over)
        belong to an abandoned trajectory: they move to retired/ so that they are never "newest".
        """
        if not self.env.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for torn in self.run_dir.glob("step-*.tmp"):
            print(f"recsys: removing torn checkpoint {torn}", flush=True)
            shutil.rmtree(torn, ignore_errors=True)
        for leftover in self.run_dir.glob(f"step-*{_DELETING}"):
            shutil.rmtree(leftover, ignore_errors=True)  # a prune that a crash interrupted
        self._retire_after(resumed_step if resumed_step is not None else -1)
        info = _read_run(self.run_dir)
        info.update({"run_id": run_id, "finished": False, "world_size": self.env.world_size})
        info.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        _write_json(self.run_dir / RUN_FILE, info)

    def _retire_after(self, step: int) -> None:
        later = [p for s, p in _step_folders(self.run_dir) if s > step]
        if not later:
            return
        dest = self.run_dir / RETIRED_DIR / time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        dest.mkdir(parents=True, exist_ok=True)
        for p in later:
            os.replace(p, dest / p.name)
        _fsync_dir(self.run_dir)
        names = ", ".join(p.name for p in later)
        print(
            f"recsys: resuming at step {max(step, 0)} abandons the later checkpoints {names}: moved to {dest} "
            "(delete it when not needed)",
            flush=True,
        )

    def mark_finished(self) -> None:
        """Rank 0: the run ended normally; `--resume auto` will start a new run next time."""
        self.wait()
        if self.env.is_main and self._failure is not None:  # the last commit failed: no next save
            earlier, self._failure = self._failure, None
            self._save_failed(*earlier)
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
        from torch.distributed.checkpoint.api import CheckpointException

        t0 = time.perf_counter()
        self.wait()
        step = int(meta["step"])
        final = self.run_dir / f"step-{step:08d}"
        tmp = final.with_name(final.name + ".tmp")
        from recsys.distributed import barrier, broadcast_object

        # Rank 0 decides and every rank follows (a rank that returned alone would leave the others
        # waiting in a collective): "skip" a step saved already (best and epoch end coincide: keep
        # the first), "failed" when the folder cannot be written or an earlier commit failed.
        action, why, earlier = broadcast_object(self._prepare(final, tmp, meta) if self.env.is_main else None)
        if earlier is not None:  # rank 0 alone saw an earlier commit fail: every rank hears it now
            self._save_failed(*earlier)
        if action == "failed":
            self._save_failed(step, why)
        if action != "go":
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
            self.saves += 1
        else:
            try:
                dcp.save(state, checkpoint_id=str(tmp))
            except (OSError, CheckpointException) as e:  # DCP raises every rank's failure on every rank
                self._write_failed(tmp, e)
            else:
                self._commit(tmp)
                self.saves += 1
        self.blocked_seconds += time.perf_counter() - t0

    def _prepare(
        self, final: Path, tmp: Path, meta: dict[str, Any]
    ) -> tuple[str, str, tuple[int, str] | None]:
        """Rank 0: ("go"|"skip"|"failed", why, an earlier commit's (step, failure) or None)."""
        earlier, self._failure = self._failure, None
        if final.exists():
            return "skip", "", earlier
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _write_json(tmp / META_FILE, meta)
        except OSError as e:
            why = _describe(e, self.run_dir)
            shutil.rmtree(tmp, ignore_errors=True)
            return "failed", why, earlier
        return "go", "", earlier

    def _write_failed(self, tmp: Path, error: BaseException) -> None:
        """Every rank, after DCP failed to write `tmp`: remove it (rank 0), then continue or stop."""
        why = _describe(error, self.run_dir)  # before the removal frees the space again
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        self._save_failed(int(tmp.name.removesuffix(".tmp").removeprefix("step-")), why)

    def _save_failed(self, step: int, why: str) -> None:
        """One line saying what failed and what is still there; raise when on_save_error is stop."""
        done = complete_checkpoints(self.run_dir) if self.env.is_main else []
        intact = f"newest intact checkpoint: step {done[-1].step}" if done else "no earlier checkpoint"
        msg = f"checkpoint of step {step} in {self.run_dir} failed: {why}; {intact}"
        self.failed_saves += 1
        if self.cfg.on_save_error == "stop":
            raise UserError(f"{msg}; stopping (train.checkpoint.on_save_error=stop): free space, then resume")
        if self.env.is_main:
            print(f"recsys: {msg}; training continues, the next save tries again", flush=True)

    def wait(self) -> None:
        """Finish a background save and commit it (every rank waits for its own part)."""
        from torch.distributed.checkpoint.api import CheckpointException

        if self._pending is None:
            return
        (fut, tmp), self._pending = self._pending, None
        try:
            fut.result()  # raises what the background write raised
        except (OSError, CheckpointException) as e:
            self._write_failed(tmp, e)
            return
        self._commit(tmp)  # the callback may still be running: _commit is idempotent under a lock

    def _commit(self, tmp: Path) -> None:
        if not self.env.is_main:
            return
        with self._lock:
            if not tmp.exists():
                return
            try:
                meta = json.loads((tmp / META_FILE).read_text())
                meta["files"] = {
                    p.name: p.stat().st_size
                    for p in sorted(tmp.iterdir())
                    if p.is_file() and p.name != META_FILE
                }
                _write_json(tmp / META_FILE, meta)
            except OSError as e:  # rank 0 alone: reported at the next save, which every rank joins
                why = _describe(e, self.run_dir)
                shutil.rmtree(tmp, ignore_errors=True)
                self._failure = (int(tmp.name.removesuffix(".tmp").removeprefix("step-")), why)
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
                # Renamed first: a crash during the delete leaves a folder no reader takes as complete.
                aside = c.path.with_name(c.path.name + _DELETING)
                os.replace(c.path, aside)
                _fsync_dir(self.run_dir)
                shutil.rmtree(aside, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- load
    def load(self, info: CheckpointInfo, state: dict[str, Any]) -> None:
        """Load checkpoint `info` into `state` in place (resharding as needed); collective."""
        self.wait()
        load_checkpoint(info.path, state)

    def find(self, step: int) -> CheckpointInfo | None:
        """The complete checkpoint of `step` in this run folder, if it is still there."""
        self.wait()
        for c in complete_checkpoints(self.run_dir):
            if c.step == step:
                return c
        return None


def load_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """dcp.load of `path` into `state`, unpickling nothing but plain values (weights_only=True)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
        """DCP's default planner loads non-tensor values with weights_only=False (any pickle runs)."""

        def load_bytes(self, read_item: Any, value: Any) -> None:
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:  # pickle.UnpicklingError and what weights_only raises on a global
                raise UserError(
                    f"checkpoint {path}: {read_item.dest_index.fqn} holds a pickled object that is not "
                    f"plain data; refusing to load it ({str(e).splitlines()[0]})"
                ) from None
            if self.flatten_state_dict:
                from torch.distributed.checkpoint._traverse import set_element

                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    try:
        dcp.load(state, checkpoint_id=str(path), planner=WeightsOnlyLoadPlanner())
    except CheckpointException as e:  # DCP gathers every rank's failure into one BaseException
        for exc, _ in e.failures.values():
            if isinstance(exc, UserError):
                raise exc from None
        raise


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
    """Write JSON durably and atomically: temp file fsynced, renamed, the folder fsynced; a crash or a
    power cut leaves the old file or the new one, never an empty or partial one."""
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _describe(error: BaseException, volume: Path | None = None) -> str:
    """One line for a failed write: the OSError inside DCP's CheckpointException when there is one.

    torch.save's writer reports a full disk as a RuntimeError ("unexpected pos …"), so the free
    space of `volume` is checked too and named when it is (nearly) none.
    """
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(error, CheckpointException):
        inner = [exc for exc, _ in error.failures.values()]
        oserrors = [e for e in inner if isinstance(e, OSError)]
        error = (oserrors or inner or [error])[0]
    if isinstance(error, OSError) and error.errno is not None:
        import errno as errno_names

        return f"{error.strerror} ({errno_names.errorcode.get(error.errno, error.errno)})"
    text = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}".strip()
    try:
        usage = shutil.disk_usage(volume) if volume is not None else None
    except OSError:
        usage = None
    if usage is not None and usage.free < _FULL_BYTES:
        return f"No space left on device (ENOSPC): {usage.free} of {usage.total} bytes free ({text})"
    return text


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

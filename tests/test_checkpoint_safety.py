"""Checkpoint defects of issue 21: a re-save on 2 ranks, rollback, prune crash, fsync, no pickle, RNG.

Real torch.distributed.checkpoint on disk throughout; the 2-rank test uses 2 gloo processes.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp

from recsys.checkpoint import Checkpointer, checkpoint_problem, complete_checkpoints, resolve_resume
from recsys.config import load_config
from recsys.distributed import DistEnv
from recsys.errors import UserError

TT = [
    "data.source.num_users=40",
    "data.source.num_items=30",
    "data.source.interactions_per_user=12",
    "data.block_size=16",
    "train.batch_size=16",
    "eval.batch_size=64",
    "model.embedding_dim=8",
    "model.two_tower.layers=[16,8]",
    "eval.ks=[5]",
    "tracking.enabled=false",
    "train.checkpoint.every_steps=5",
    "train.checkpoint.async_save=false",
]


def _checkpointer(run_dir: Path, rank: int = 0, world: int = 1, *sets: str) -> Checkpointer:
    cfg = load_config("two_tower_synth", ["train.checkpoint.async_save=false", *sets])
    env = DistEnv(rank, rank, world, world, torch.device("cpu"), "gloo")
    return Checkpointer(cfg, env, run_dir, "max")


def _save(ck: Checkpointer, step: int, value: float = 1.0) -> None:
    ck.save({"w": torch.full((4,), value)}, {"step": step})


# ------------------------------------------------------------------------ the same step on 2 ranks
def _resave_worker(rank: int, init: str, run_dir: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2, timeout=timedelta(seconds=20))
    ck = _checkpointer(Path(run_dir), rank, 2)
    ck.start_run(None)
    _save(ck, 10, 1.0)
    _save(ck, 10, 2.0)  # the step folder exists now: every rank must skip it together
    # Rank 1 follows with a collective of its own; if rank 0 skipped alone they no longer pair up.
    box = [rank * 100 + 7]
    dist.broadcast_object_list(box, src=1)
    Path(out, f"r{rank}").write_text(str(box[0]))
    dist.destroy_process_group()


def test_a_second_save_of_a_step_is_skipped_on_every_rank(tmp_path: Path) -> None:
    init = f"file://{tmp_path / 'rdzv'}"
    mp.start_processes(
        _resave_worker, args=(init, str(tmp_path / "run"), str(tmp_path)), nprocs=2, start_method="spawn"
    )
    assert [(tmp_path / f"r{r}").read_text() for r in (0, 1)] == ["107", "107"]
    state = {"w": torch.zeros(4)}
    (info,) = complete_checkpoints(tmp_path / "run")
    dcp.load(state, checkpoint_id=str(info.path))
    assert state["w"].tolist() == [1.0] * 4  # the first save kept


# ----------------------------------------------------------------------------------- rollback
@pytest.fixture(scope="module")
def tt_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from recsys.data.prepare import prepare

    out = tmp_path_factory.mktemp("tt") / "prepared"
    prepare(load_config("two_tower_synth", [*TT, f"data.prepared_dir={out}"]), overwrite=False)
    return out


def test_resuming_an_older_step_retires_the_abandoned_later_checkpoints(
    tt_data: Path, tmp_path: Path
) -> None:
    from recsys.train import train

    sets = [*TT, f"data.prepared_dir={tt_data}", f"train.checkpoint.dir={tmp_path / 'ckpt'}"]
    train(load_config("two_tower_synth", [*sets, "train.max_steps=15"]), resume="never")
    (run_dir,) = (tmp_path / "ckpt").glob("run-*")
    assert [c.step for c in complete_checkpoints(run_dir)] == [10, 15]
    # Roll back to step 10 and stop at 12 (saved at the end): step 15 is the abandoned trajectory's.
    r = train(
        load_config("two_tower_synth", [*sets, "train.max_steps=12"]), resume=str(run_dir / "step-00000010")
    )
    assert r.resumed_from == 10 and r.steps == 12
    assert [c.step for c in complete_checkpoints(run_dir)] == [10, 12]
    (retired,) = (run_dir / "retired").iterdir()
    assert [p.name for p in retired.iterdir()] == ["step-00000015"]
    run = json.loads((run_dir / "run.json").read_text())
    run["finished"] = False
    (run_dir / "run.json").write_text(json.dumps(run))
    assert resolve_resume(tmp_path / "ckpt", "auto")[1].step == 12  # "newest" is the new trajectory


# --------------------------------------------------------------------------------------- prune
def test_a_crash_while_pruning_never_leaves_a_folder_that_looks_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = _checkpointer(tmp_path / "run", 0, 1, "train.checkpoint.keep_last=1")
    ck.start_run(None)
    _save(ck, 1)

    real_rmtree = shutil.rmtree

    def crash_midway(path: os.PathLike, ignore_errors: bool = False) -> None:
        shards = sorted(Path(path).glob("*.distcp"))
        if not shards or Path(path).name.endswith(".tmp"):
            return real_rmtree(path, ignore_errors=ignore_errors)
        shards[0].unlink()  # the process dies after the first file is gone (SIGKILL, a power cut)
        raise SystemExit("killed while pruning")

    monkeypatch.setattr(shutil, "rmtree", crash_midway)
    with pytest.raises(SystemExit):
        _save(ck, 2)
    monkeypatch.undo()
    assert [c.step for c in complete_checkpoints(tmp_path / "run")] == [2]
    _checkpointer(tmp_path / "run").start_run(None, resumed_step=2)  # the next start removes the leftover
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.json", "step-00000002"]


# ---------------------------------------------------------------------------------------- fsync
def test_json_markers_are_fsynced_before_and_after_the_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(
        os,
        "fsync",
        lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))[1],
    )
    monkeypatch.setattr(
        os, "replace", lambda a, b: (events.append(("replace", str(b))), real_replace(a, b))[1]
    )
    run_dir = tmp_path / "run"
    ck = _checkpointer(run_dir)
    ck.start_run("abc")
    marker = str(run_dir / "run.json")
    i = events.index(("replace", marker))
    assert ("fsync", marker + ".part") in events[:i]  # the data is on disk before it becomes visible
    assert ("fsync", str(run_dir)) in events[i + 1 :]  # and the rename itself is durable


# ------------------------------------------------------------------------------------ no pickle
class _Payload:
    def __reduce__(self) -> tuple:
        return (Path.touch, (Path(os.environ["RECSYS_TEST_PWNED"]),))


def test_loading_a_checkpoint_runs_no_pickled_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("RECSYS_TEST_PWNED", str(pwned))
    run_dir = tmp_path / "run"
    ck = _checkpointer(run_dir)
    ck.start_run(None)
    ck.save({"w": torch.ones(2), "evil": _Payload()}, {"step": 3})
    (info,) = complete_checkpoints(run_dir)
    with pytest.raises(UserError, match="evil holds a pickled object"):
        ck.load(info, {"w": torch.zeros(2), "evil": None})
    assert not pwned.exists()
    state = {"w": torch.zeros(2), "note": None}
    ck.save({"w": torch.ones(2), "note": json.dumps({"a": 1})}, {"step": 4})
    ck.load(complete_checkpoints(run_dir)[-1], state)  # plain values still load
    assert state["note"] == '{"a": 1}' and state["w"].tolist() == [1.0, 1.0]


def test_rng_state_is_tensors_and_restores_every_generator() -> None:
    from recsys.trainer import rng_state, set_rng_state

    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.standard_normal()  # a cached Gaussian in NumPy's state
    random.gauss(0, 1)
    saved = rng_state()
    assert all(isinstance(v, torch.Tensor) for v in saved.values())
    first = (
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    )
    set_rng_state(saved)
    assert (
        random.random(),
        random.gauss(0, 1),
        np.random.standard_normal(3).tolist(),
        torch.rand(3).tolist(),
    ) == first


# ----------------------------------------------------------------------------- damaged newest
def test_a_truncated_shard_makes_resume_fall_back_and_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _checkpointer(tmp_path / "root" / "run-1", 0, 1, "train.checkpoint.keep_last=3")
    ck.start_run(None)
    _save(ck, 1)
    _save(ck, 2)
    shard = next((tmp_path / "root" / "run-1" / "step-00000002").glob("*.distcp"))
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    assert "truncated" in (checkpoint_problem(shard.parent) or "")
    run_dir, info = resolve_resume(tmp_path / "root", "auto")
    assert info is not None and info.step == 1
    assert "step-00000002 is damaged" in capsys.readouterr().out


# ------------------------------------------------------------------------------------ full volume
@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB tmpfs (root only)."""
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    vol = tmp_path / "vol"
    vol.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(vol)], check=True)
    try:
        yield vol
    finally:
        subprocess.run(["umount", "-l", str(vol)], check=True)


@pytest.mark.parametrize("async_save", [False, True])
def test_a_full_volume_is_one_line_and_earlier_checkpoints_stay(
    small_volume: Path, async_save: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = _checkpointer(
        small_volume / "run",
        0,
        1,
        f"train.checkpoint.async_save={async_save}",
        "train.checkpoint.keep_last=3",
    )
    ck.start_run(None)
    small, big = torch.ones(1000), torch.ones(400_000)  # 4 KB; 1.6 MB does not fit beside the filler
    ck.save({"w": small}, {"step": 1})
    ck.wait()
    (small_volume / "filler").write_bytes(b"\0" * 900_000)
    ck.save({"w": big}, {"step": 2})
    ck.wait()
    out = capsys.readouterr().out
    (line,) = [ln for ln in out.splitlines() if "failed" in ln]
    assert "checkpoint of step 2" in line and "No space left on device (ENOSPC)" in line
    assert "newest intact checkpoint: step 1" in line and "training continues" in line
    assert [c.step for c in complete_checkpoints(small_volume / "run")] == [1]
    assert not list((small_volume / "run").glob("*.tmp"))  # the torn write is gone
    ck.save({"w": small}, {"step": 3})  # space is there again for a small one
    ck.wait()
    assert [c.step for c in complete_checkpoints(small_volume / "run")] == [1, 3]
    stop = _checkpointer(
        small_volume / "run",
        0,
        1,
        f"train.checkpoint.async_save={async_save}",
        "train.checkpoint.on_save_error=stop",
    )
    with pytest.raises(UserError, match=r"step 4 .* No space left on device \(ENOSPC\).*stopping"):
        stop.save({"w": big}, {"step": 4})
        stop.wait()

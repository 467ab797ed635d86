"""The chaos tier (`make chaos`): each training-fault scenario runs for real here and must survive.

Also the pieces they rely on: SIGTERM handling in one process, the rendered grace periods, the runner.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recsys.chaos import REGISTRY, format_table, run_scenario

MINE = ["preempt", "disk_full", "corrupt_checkpoint", "frozen_peer", "shm_collision"]


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.parametrize("name", MINE)
def test_scenario_survives(name: str) -> None:
    if name == "disk_full" and os.geteuid() != 0:
        pytest.skip("mounts a tmpfs: needs root")
    row = run_scenario(name)
    print(format_table([row]))
    assert row["survived"], row["detail"]


def test_the_registry_lists_every_training_scenario_and_each_has_the_contract() -> None:
    import importlib

    assert set(MINE) <= set(REGISTRY)
    for name in REGISTRY:
        module = importlib.import_module(f"recsys.chaos.{name}")
        assert isinstance(module.SCENARIO, str) and callable(module.run)


def test_a_scenario_that_crashes_is_a_failed_row(monkeypatch: pytest.MonkeyPatch) -> None:
    import recsys.chaos.preempt as preempt

    def broken(workdir: Path) -> dict:
        raise RuntimeError("boom")

    monkeypatch.setattr(preempt, "run", broken)
    row = run_scenario("preempt")
    assert row["survived"] is False and "boom" in row["detail"]
    assert "FAILED" in format_table([row])


def test_rendered_jobs_give_the_trainer_its_grace() -> None:
    from recsys.config import load_config
    from recsys.launch.kube import render_objects

    cfg = load_config("two_tower_synth", ["train.checkpoint.preempt_grace_s=40"])
    pj = render_objects(cfg, "pytorchjob")[1]
    for replica in pj["spec"]["pytorchReplicaSpecs"].values():
        pod = replica["template"]["spec"]
        assert pod["terminationGracePeriodSeconds"] == 50
        env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
        assert env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"] == "45"
    tj = render_objects(cfg, "trainjob")[1]
    patch = tj["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    assert patch["template"]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 50
    assert {"name": "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "value": "45"} in tj["spec"]["trainer"]["env"]


@pytest.mark.slow
def test_sigterm_in_one_process_checkpoints_the_step_reached_and_exits_143(tmp_path: Path) -> None:
    from recsys.chaos.common import checkpoint_steps, tiny_config, wait_until

    cfg, path = tiny_config(tmp_path, "train.epochs=3", "train.checkpoint.every_steps=1000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = tmp_path / "log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "recsys", "train", "--config", str(path), "--resume", "never"],
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        )  # fmt: skip
    wait_until(lambda: "train:" in log.read_text() and "it/s" in log.read_text(), 300, "training steps")
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    text = log.read_text()
    assert "preempted (SIGTERM) at step" in text
    (step,) = checkpoint_steps(tmp_path / "ckpt")
    assert f"preempted at step {step}: checkpoint written" in text
    assert 0 < step < 1000

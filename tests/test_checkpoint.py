"""Durable training: checkpoints, resume at the exact next batch, resharding, torn checkpoints, early stopping.

The real trainer, torch.distributed.checkpoint and streaming loader throughout; several runs use
torchrun with 2 gloo ranks. Sample ids are recorded by a wrapper script in this file (not by the
product): it wraps Trainer.epoch_batches to log the (user, item) rows of every batch, and kills
rank 1 with SIGKILL mid-epoch once a checkpoint is complete.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import free_port

from recsys.checkpoint import complete_checkpoints, resolve_resume
from recsys.config import Config, dump_config, load_config
from recsys.errors import UserError

TT = [
    "data.source.num_users=400",
    "data.source.num_items=200",
    "data.source.interactions_per_user=20",
    "data.block_size=32",
    "train.batch_size=128",
    "train.epochs=2",
    "train.log_every_steps=5",
    "eval.ks=[10]",
]
# Planted overfitting: 30k rows over 8 features × 2000 values, dim 16 and a high sparse LR: val AUC
# peaks after the first epoch and falls from then on.
OVERFIT = [
    "data.source.rows=30000",
    "data.source.num_sparse=8",
    "data.source.cardinality=2000",
    "data.source.days=3",
    "model.embedding_dim=16",
    "model.dlrm.dense_arch_layers=[32,16]",
    "train.batch_size=512",
    "train.decay=none",
    "train.epochs=8",
    "train.sparse_optimizer.lr=0.5",
    "train.dense_optimizer.lr=0.01",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two-Tower and DLRM data prepared once for the module."""
    from recsys.data.prepare import prepare

    root = tmp_path_factory.mktemp("ckpt_data")
    out = {}
    for name, config, sets in (("tt", "two_tower_synth", TT), ("dlrm", "dlrm_synth", OVERFIT)):
        cfg = load_config(config, [*sets, f"data.prepared_dir={root / name}"])
        prepare(cfg, overwrite=False)
        out[name] = root / name
    return out


def _cfg(data: dict[str, Path], which: str, tmp: Path, uri: str | None, *sets: str) -> Config:
    config, base = ("two_tower_synth", TT) if which == "tt" else ("dlrm_synth", OVERFIT)
    tracking = [f"tracking.uri={uri}", "tracking.experiment=test-ckpt"] if uri else ["tracking.enabled=false"]
    return load_config(
        config,
        [
            *base,
            f"data.prepared_dir={data[which]}",
            f"train.checkpoint.dir={tmp / 'ckpt'}",
            *tracking,
            *sets,
        ],
    )


# ---------------------------------------------------------------------------------- in one process
@pytest.mark.slow
def test_resume_from_a_mid_epoch_checkpoint_equals_the_uninterrupted_run(
    data: dict[str, Path], tmp_path: Path
) -> None:
    from recsys.train import train

    sets = ["train.checkpoint.every_steps=10"]
    ref = train(_cfg(data, "tt", tmp_path / "ref", None, *sets), resume="never")
    part = train(_cfg(data, "tt", tmp_path / "res", None, *sets, "train.max_steps=30"), resume="never")
    assert part.steps == 30 and ref.steps > 30 and ref.steps % 30  # 30 lies inside an epoch
    (run_dir,) = (tmp_path / "res" / "ckpt").glob("run-*")
    assert [c.step for c in complete_checkpoints(run_dir)] == [20, 30]  # keep_last 2 pruned step 10
    step30 = run_dir / "step-00000030"
    full = train(_cfg(data, "tt", tmp_path / "res", None, *sets), resume=str(step30))
    assert full.resumed_from == 30 and full.steps == ref.steps
    for k in ("loss", "recall@10", "ndcg@10", "auroc"):
        assert full.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k


@pytest.mark.slow
def test_torn_checkpoints_are_skipped_and_removed(data: dict[str, Path], tmp_path: Path) -> None:
    from recsys.train import train

    cfg = _cfg(data, "tt", tmp_path, None, "train.checkpoint.every_steps=10", "train.max_steps=20")
    train(cfg, resume="never")
    (run_dir,) = (tmp_path / "ckpt").glob("run-*")
    info = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps({**info, "finished": False}))  # as after a crash
    good = run_dir / "step-00000020"
    # Killed while DCP was writing: files there, no .metadata yet, still under the .tmp name.
    torn = run_dir / "step-00000030.tmp"
    shutil.copytree(good, torn)
    (torn / ".metadata").unlink()
    # A folder with DCP's files but without recsys.json is not complete either.
    half = run_dir / "step-00000025"
    shutil.copytree(good, half)
    (half / "recsys.json").unlink()
    assert resolve_resume(tmp_path / "ckpt", "auto") == (run_dir, complete_checkpoints(run_dir)[-1])
    assert complete_checkpoints(run_dir)[-1].step == 20

    again = train(cfg.model_copy(update={}, deep=True), resume="auto")
    assert again.resumed_from == 20 and again.steps == 20
    assert not torn.exists()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_names_the_difference(data: dict[str, Path], tmp_path: Path) -> None:
    from recsys.train import train

    train(_cfg(data, "tt", tmp_path, None, "train.max_steps=10"), resume="never")
    (step,) = (tmp_path / "ckpt").glob("run-*/step-*")
    other = _cfg(data, "tt", tmp_path, None, "model.embedding_dim=16")
    with pytest.raises(UserError, match=r"does not fit this config: model\.embedding_dim: 32 → 16"):
        train(other, resume=str(step))
    with pytest.raises(UserError, match="no complete checkpoint"):
        train(other, resume=str(tmp_path / "nothing-here"))


@pytest.mark.slow
def test_early_stopping_restores_the_best_epoch(data: dict[str, Path], tmp_path: Path) -> None:
    from recsys.train import train

    es = ["train.early_stopping.metric=val/auc", "train.early_stopping.patience=2"]
    best = train(_cfg(data, "dlrm", tmp_path / "a", None, *es), resume="never")
    assert best.stopped_early and best.best is not None
    aucs = [v["auc"] for v in best.validations]
    assert best.best["value"] == max(aucs) and aucs.index(max(aucs)) == len(aucs) - 3  # then 2 worse
    assert best.steps < 8 * (best.steps // len(aucs))  # stopped before the 8 planned epochs
    last = train(
        _cfg(data, "dlrm", tmp_path / "b", None, *es, "train.early_stopping.restore_best=false"),
        resume="never",
    )
    assert last.steps == best.steps
    # The restored best state tests better than the last (overfitted) one.
    assert best.metrics["auc"] > last.metrics["auc"] + 0.01, (best.metrics, last.metrics)


# ---------------------------------------------------------------------------------- under torchrun
WRAPPER = r"""
import json, os, signal, sys, time
from pathlib import Path
from recsys import trainer as T

out, kill_at, root = Path(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
rank = int(os.environ["RANK"])
attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
orig_batches, orig_step = T.Trainer.epoch_batches, T.Trainer.train_step

def epoch_batches(self):
    step, epoch = self.step, self.epoch
    with open(out / f"rows-r{rank}-a{attempt}.jsonl", "a") as f:
        for b in orig_batches(self):
            kjt = b.sparse_features
            rows = list(zip(kjt["user_id"].values().tolist(), kjt["item_id"].values().tolist()))
            f.write(json.dumps({"epoch": epoch, "step": step, "rows": rows}) + "\n")
            f.flush()
            step += 1
            yield b

def train_step(self, it):
    if attempt == 0 and rank == 1 and kill_at and self.step == kill_at:
        deadline = time.monotonic() + 60
        while not list(root.glob("run-*/step-*/recsys.json")) and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGKILL)
    return orig_step(self, it)

T.Trainer.epoch_batches, T.Trainer.train_step = epoch_batches, train_step
from recsys.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _torchrun(cfg: Config, tmp: Path, nproc: int, *, kill_at: int = 0, resume: str = "auto") -> str:
    """Run `recsys train` under torchrun (max 1 restart) through the recording wrapper; returns the log."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "wrapper.py").write_text(WRAPPER)
    (tmp / "cfg.yaml").write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONUNBUFFERED": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--max-restarts", "1",
        "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
        str(tmp / "wrapper.py"), str(tmp), str(kill_at), str(cfg.train.checkpoint.dir),
        "train", "--config", str(tmp / "cfg.yaml"), "--resume", resume,
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    return log


def _records(tmp: Path) -> dict[tuple[int, int], list]:
    """(rank, step) → rows trained at that step, keeping only what the surviving attempt trained."""
    out: dict[tuple[int, int], list] = {}
    for rank in (0, 1):
        attempts = sorted(tmp.glob(f"rows-r{rank}-a*.jsonl"))
        lines = [[json.loads(x) for x in a.read_text().splitlines()] for a in attempts]
        for i, recs in enumerate(lines):
            # An attempt's batches count only up to where the next attempt resumed.
            limit = lines[i + 1][0]["step"] if i + 1 < len(lines) else float("inf")
            for r in recs:
                if r["step"] < limit:
                    out[(rank, r["step"])] = (r["epoch"], r["rows"])
    return out


def _run_metrics(uri: str, run_id: str) -> dict[str, float]:
    import mlflow

    return dict(mlflow.MlflowClient(uri).get_run(run_id).data.metrics)


@pytest.mark.slow
@pytest.mark.dist
def test_kill9_of_one_rank_resumes_and_ends_like_the_uninterrupted_run(
    data: dict[str, Path], tmp_path: Path, mlflow_server: str
) -> None:
    import mlflow

    sets = ["train.checkpoint.every_steps=8", "tracking.log_model=false"]
    ref_cfg = _cfg(data, "tt", tmp_path / "ref", mlflow_server, *sets, "tracking.run_name=ref")
    _torchrun(ref_cfg, tmp_path / "ref", 2)
    cfg = _cfg(data, "tt", tmp_path / "kill", mlflow_server, *sets, "tracking.run_name=killed")
    log = _torchrun(cfg, tmp_path / "kill", 2, kill_at=13)
    assert "recsys: resumed from" in log and "step-00000008" in log, log[-3000:]
    assert len(list((tmp_path / "kill").glob("rows-r1-a*.jsonl"))) == 2  # the kill really happened

    ref, got = _records(tmp_path / "ref"), _records(tmp_path / "kill")
    assert got == ref  # the same batches, at the same steps, on the same ranks: nothing repeated or skipped
    per_epoch: dict[int, Counter] = {}
    for epoch, rows in got.values():
        per_epoch.setdefault(epoch, Counter()).update(map(tuple, rows))
    assert sorted(per_epoch) == [0, 1]
    from recsys.data.loader import read_split_arrays

    train = read_split_arrays(cfg.data.prepared_dir, "train")["sparse"]
    every = Counter(map(tuple, train[:, :2].tolist()))
    for epoch, seen in per_epoch.items():
        assert not seen - every, f"epoch {epoch}: rows trained more often than they occur"

    client = mlflow.MlflowClient(mlflow_server)
    exp = client.get_experiment_by_name("test-ckpt")
    runs = {r.info.run_name: r for r in client.search_runs([exp.experiment_id])}
    assert runs["killed"].info.status == "FINISHED"
    assert [r.info.run_name for r in client.search_runs([exp.experiment_id])].count("killed") == 1
    a, b = (
        _run_metrics(mlflow_server, runs["ref"].info.run_id),
        _run_metrics(mlflow_server, runs["killed"].info.run_id),
    )
    for k in ("test/loss", "test/recall_at_10", "test/ndcg_at_10", "val/loss"):
        assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), k
    steps = {m.step for m in client.get_metric_history(runs["killed"].info.run_id, "train/loss")}
    assert steps == {m.step for m in client.get_metric_history(runs["ref"].info.run_id, "train/loss")}


def _logged_state(uri: str, run_name: str) -> dict[str, torch.Tensor]:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-ckpt")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    path = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="state_dict/model.pt", tracking_uri=uri
    )
    return torch.load(path, weights_only=True)


def _assert_same_model(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _resave_in_one_process(cfg: Config, saved: Path, run_dir: Path) -> Path:
    """Load checkpoint `saved` in this process (world size 1: DCP reshards it) and save it again at the
    same step into `run_dir`, training nothing: the 2 → 1 leg of a resharding round trip."""
    from recsys.checkpoint import Checkpointer
    from recsys.data.metadata import read_metadata
    from recsys.distributed import cleanup, init_distributed
    from recsys.tracking import NullTracker
    from recsys.trainer import Trainer

    (info,) = [c for c in complete_checkpoints(saved.parent) if c.path == saved]
    env = init_distributed(cfg.train.device)
    try:
        assert env.world_size == 1
        trainer = Trainer(cfg, read_metadata(cfg.data.prepared_dir), env, NullTracker())
        ckpt = Checkpointer(cfg, env, run_dir, cfg.best_mode())
        trainer.restore(ckpt, info)
        ckpt.start_run(None)
        trainer.save(ckpt)
        ckpt.wait()
        return run_dir / saved.name
    finally:
        cleanup()


@pytest.mark.slow
@pytest.mark.dist
def test_resharding_2_to_1_and_1_to_2_gives_identical_models(
    data: dict[str, Path], tmp_path: Path, mlflow_server: str
) -> None:
    """Saved by 2 ranks at step 12, loaded and saved again by 1, loaded by 2 that train on to step 24:
    the model and metrics equal the uninterrupted 2-rank run's. Continuing after both reshards makes
    the optimizer states, the loader position and the counters count, not only the weights."""
    sets = ["train.max_steps=24", "train.checkpoint.every_steps=12", "train.checkpoint.keep_last=2"]
    ref_cfg = _cfg(data, "tt", tmp_path / "ref", mlflow_server, *sets, "tracking.run_name=uninterrupted")
    _torchrun(ref_cfg, tmp_path / "ref", 2)
    (saved2,) = (tmp_path / "ref" / "ckpt").glob("run-*/step-00000012")

    hop = _cfg(data, "tt", tmp_path / "hop", None, *sets)
    saved1 = _resave_in_one_process(hop, saved2, tmp_path / "hop" / "ckpt" / "run-by1")
    assert json.loads((saved1 / "recsys.json").read_text())["world_size"] == 1

    # The continuing job logs to another store: its checkpoint has no run there, so it gets its own.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    cont = _cfg(data, "tt", tmp_path / "hop", other, *sets, "tracking.run_name=resharded-twice")
    log = _torchrun(cont, tmp_path / "cont", 2, resume=str(saved1))
    assert "resumed from" in log and "step 12" in log, log[-3000:]
    a, b = _logged_state(mlflow_server, "uninterrupted"), _logged_state(other, "resharded-twice")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6), k
    ma = _run_metrics(mlflow_server, _run_by_name(mlflow_server, "uninterrupted"))
    mb = _run_metrics(other, _run_by_name(other, "resharded-twice"))
    for k in ("test/loss", "test/recall_at_10", "test/ndcg_at_10", "val/loss"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-5, abs=1e-6), k


def _run_by_name(uri: str, run_name: str) -> str:
    import mlflow

    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("test-ckpt")
    (run,) = client.search_runs([exp.experiment_id], f"attributes.run_name = '{run_name}'")
    return run.info.run_id


# ------------------------------------------------------------------------------------ config checks
def test_config_rejects_what_would_fail_late() -> None:
    from recsys.config import ConfigError

    cases = {
        "eval.ks=[10, 0]": "eval.ks.1",
        "train.max_steps=0": "train.max_steps",
        "train.batch_size='1024'": "train.batch_size",
        "train.sparse_optimizer.weight_decay=0.01": "weight_decay",
        "train.early_stopping.metric=val/ndcg@10": "not a validation metric of model.kind 'dlrm'",
    }
    for override, where in cases.items():
        with pytest.raises(ConfigError, match=where.replace(".", r"\.").replace("'", ".")):
            load_config("dlrm_synth", [override])
    # --set values are YAML-parsed, so numbers stay numbers
    assert load_config("dlrm_synth", ["train.batch_size=2048"]).train.batch_size == 2048
    tt = load_config("two_tower_synth", ["train.early_stopping.metric=val/ndcg@10"])
    assert tt.best_mode() == "max"
    assert load_config("two_tower_synth", ["train.early_stopping.metric=val/loss"]).best_mode() == "min"


def test_train_refuses_data_prepared_with_other_settings(data: dict[str, Path], tmp_path: Path) -> None:
    from recsys.data.metadata import read_metadata
    from recsys.train import check_data_settings

    cfg = _cfg(data, "tt", tmp_path, None, "data.source.num_items=999")
    meta = read_metadata(cfg.data.prepared_dir)
    with pytest.raises(UserError, match=r"data\.source\.num_items: 200 → 999.*--allow-data-mismatch"):
        check_data_settings(cfg, meta, allow=False)
    check_data_settings(cfg, meta, allow=True)
    check_data_settings(_cfg(data, "tt", tmp_path, None), meta, allow=False)


@pytest.mark.slow
def test_train_prints_the_results_table_without_tracking(
    data: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from recsys.train import train

    train(_cfg(data, "tt", tmp_path, None, "train.max_steps=5"), resume="never")
    out = capsys.readouterr().out
    assert "metric" in out and "val (tested)" in out
    assert any(line.startswith("recall@10") for line in out.splitlines())


def test_set_reads_scientific_notation_as_a_number() -> None:
    # YAML 1.1 would read 1e-5 (no dot) as the string '1e-5'.
    cfg = load_config("dlrm_synth", ["train.sparse_optimizer.lr=1e-5", "train.dense_optimizer.lr=2E-3"])
    assert cfg.train.sparse_optimizer.lr == 1e-5 and cfg.train.dense_optimizer.lr == 2e-3


def test_resuming_over_other_window_folders_is_a_difference(tmp_path: Path) -> None:
    """A checkpoint trained over data.train_dirs [w1] does not fit a config over [w1, w2]."""
    from recsys.checkpoint import fingerprint
    from recsys.config import config_differences, load_config

    def fp(dirs: list[Path]) -> dict:
        sets = [f"data.train_dirs=[{','.join(str(d) for d in dirs)}]"] if dirs else []
        return fingerprint(load_config("two_tower_synth", sets), {"user_id": 10, "item_id": 10})

    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    saved = fp([w1])
    assert config_differences(saved, fp([w1]), new_fields=False) == []
    assert any("train_dirs" in d for d in config_differences(saved, fp([w1, w2]), new_fields=False))
    assert "data.train_dirs" not in fp([])  # checkpoints of runs without windows keep their fingerprint

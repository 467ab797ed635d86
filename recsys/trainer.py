"""The Trainer: built once from the resolved Config, the Metadata and the DistEnv; holds the sharded model,
the optimizers and LR schedule, the loader, the counters and the best validation value so far.

`state_dict()` / `load_state_dict()` cover all of it, so a checkpoint saves one object and resume is
"load, then keep looping". `fit()` reads top to bottom: segments of steps end where validation, a
checkpoint or the epoch end is due (TorchRec's TrainPipelineSparseDist drains at a segment's end, so
the loader has yielded exactly the batches that were trained), and everything else is a plain if.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from recsys.errors import UserError
from recsys.preemption import PreemptionGuard

if TYPE_CHECKING:
    from recsys.checkpoint import Checkpointer
    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.distributed import DistEnv
    from recsys.tracking import Tracker


@dataclass
class TrainResult:
    """What a training run produced (the same on every rank; rank 0's values are authoritative)."""

    run_id: str | None
    metrics: dict[str, float]
    baselines: dict[str, float]
    plan: str
    world_size: int
    global_batch_size: int
    steps: int
    samples_per_s: float
    train_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best: dict[str, Any] | None = None
    stopped_early: bool = False
    resumed_from: int | None = None
    validations: list[dict[str, float]] = field(default_factory=list)
    tested_validation: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (the same seed on every rank: DMP broadcasts dense weights anyway)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, torch.Tensor]:
    """Python, NumPy and torch RNG states as tensors (a checkpoint then holds no pickled object)."""
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert version == 3 and kind == "MT19937", (version, kind)
    return {
        "python": torch.tensor(words, dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_pos": torch.tensor([pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what rng_state() returned."""
    has, value = state["python_gauss"].tolist()
    random.setstate((3, tuple(state["python"].tolist()), value if has else None))
    pos, has_gauss = state["numpy_pos"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"])


def _rng_neutral(it: Iterator[Any]) -> Iterator[Any]:
    """`it`, whose start leaves torch's RNG as it was: DataLoader draws a seed when its iteration
    starts (at the first batch), and a resumed run starts one mid-epoch, so that draw would shift
    the stream that dropout and sampled negatives read."""
    state = torch.get_rng_state()
    try:
        first = next(it)
    except StopIteration:
        return
    finally:
        torch.set_rng_state(state)
    yield first
    yield from it


class _Progress:
    """Rank-0 tqdm bar with loss and samples/s; silent elsewhere."""

    def __init__(self, total: int, initial: int, enabled: bool) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, initial=initial, disable=not enabled, dynamic_ncols=True, desc="train")

    def update(self, loss: float, samples_per_s: float) -> None:
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{samples_per_s:,.0f}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class Trainer:
    """One training run's state and steps: build → train_step → validate → test."""

    def __init__(self, cfg: Config, meta: Metadata, env: DistEnv, tracker: Tracker) -> None:
        from recsys.data.lineage import train_split
        from recsys.data.loader import make_train_loader
        from recsys.distributed import control_group, make_optimizer, shard_model
        from recsys.models.task import build_task, log_q_from_train
        from recsys.progress import make_reporter

        self.cfg, self.meta, self.env, self.tracker = cfg, meta, env, tracker
        train = train_split(cfg, meta)  # every train folder's (data.train_dirs)
        self.train_blocks = train.blocks
        self.train_ctr = train.positives / max(train.rows, 1)
        task = build_task(cfg, meta, "meta", log_q_from_train(cfg, meta), dense_device=env.device)
        self.model, self.plan = shard_model(task, cfg, env)
        self.loader = make_train_loader(cfg, meta, env.world_size)
        self.blocks_per_step = cfg.train.batch_size // meta.block_size * env.world_size
        self.steps_per_epoch = self._steps_per_epoch()
        self.blocks_left_out = self.train_blocks - self.steps_per_epoch * self.blocks_per_step
        # Counters: everything below is in state_dict().
        self.step, self.epoch, self.epoch_blocks = 0, 0, 0
        self.best: dict[str, Any] | None = None
        self.bad_validations = 0
        self.stopped_early = False
        self.run_id: str | None = None
        # Where this run comes from (recsys.warm_start.provenance): saved with every checkpoint.
        self.provenance: dict[str, Any] = {}
        self.total = self._planned_total()
        self.optimizer, self.schedule = make_optimizer(self.model, cfg, self.total)
        self.pipeline = None
        if cfg.train.pipeline:
            from torchrec.distributed.train_pipeline import TrainPipelineSparseDist

            self.pipeline = TrainPipelineSparseDist(
                self.model, self.optimizer, env.device, execute_all_batches=True
            )
        self.global_batch = cfg.train.batch_size * env.world_size
        self.history: list[dict[str, float]] = []
        self.validations: list[dict[str, float]] = []
        self._arrays: dict[str, Any] | None = None
        self._window = (0.0, 0, time.perf_counter())
        self.steps_this_run = 0
        # Preemption: SIGTERM on any rank stops every rank at the same step (agreed over a gloo group).
        self.preempted = False
        self._guard: PreemptionGuard | None = None
        self._control = control_group()
        # Kubeflow TrainJob status (rank 0, only where the Trainer injects its status server).
        self.job_status = make_reporter(env.is_main)

    # ------------------------------------------------------------------------------------- sizing
    def _steps_per_epoch(self) -> int:
        from recsys.distributed import all_reduce_min

        n = all_reduce_min(len(self.loader))
        if n == 0:
            raise UserError(
                f"{self.cfg.data.prepared_dir}: the train split has fewer rows than one global batch "
                f"({self.cfg.train.batch_size} × {self.env.world_size} ranks); lower train.batch_size"
            )
        return n

    def steps_left_in_epoch(self) -> int:
        """Steps until this epoch's end; after a resume with another world size, whole global batches."""
        done, rest = divmod(self.epoch_blocks, self.blocks_per_step)
        if rest == 0 and done <= self.steps_per_epoch:
            return self.steps_per_epoch - done
        # Resharded resume: streaming partitions the remaining blocks over the new ranks; count only
        # whole global batches, so no rank runs out before the others (the epoch's tail is dropped).
        return max((self.train_blocks - self.epoch_blocks) // self.blocks_per_step, 0)

    def _planned_total(self) -> int:
        total = self.step + self.steps_left_in_epoch()
        total += max(self.cfg.train.epochs - self.epoch - 1, 0) * self.steps_per_epoch
        if self.cfg.train.max_steps is not None:
            total = min(total, self.cfg.train.max_steps)
        return total

    # -------------------------------------------------------------------------------------- state
    def counters(self) -> dict[str, Any]:
        """Step/epoch counters, best value, early-stopping count and MLflow run id (JSON-able)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "epoch_blocks": self.epoch_blocks,
            "best": self.best,
            "bad_validations": self.bad_validations,
            "stopped_early": self.stopped_early,
            "run_id": self.run_id,
            "world_size": self.env.world_size,
        }

    def loader_state(self) -> dict[str, Any]:
        """The streaming loader's resume state at the current step (also right at an epoch end)."""
        state = dict(self.loader.state_dict() or {})
        state.update(epoch=self.epoch, sample_in_epoch=self.epoch_blocks)
        return state

    def state_dict(self) -> dict[str, Any]:
        """Everything a resume needs: sharded model, fused + dense optimizer state, counters, loader, RNG."""
        return {
            "model": self.model.state_dict(),
            "optim": self.optimizer.state_dict(),
            "trainer": json.dumps(self.counters()),
            "loader": json.dumps(self.loader_state()),
            "rng": rng_state(),
        }

    def restore(self, ckpt: Checkpointer, info: Any) -> None:
        """Load checkpoint `info` (DCP reshards to this world size) and continue from its next batch."""
        from torchrec.optim.keyed import KeyedOptimizerWrapper

        # The dense optimizer's state is created lazily at its first step; DCP loads in place, so
        # create it first (a zero-gradient step; every value is then overwritten by the load).
        for _, opt in self.optimizer.optimizers:
            if isinstance(opt, KeyedOptimizerWrapper) and not any(opt.state.values()):
                opt.init_state()
        state = self.state_dict()
        ckpt.load(info, state)
        self.load_state_dict(state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from state_dict()'s layout (tensors already loaded in place by DCP)."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        c = json.loads(state["trainer"])
        self.step, self.epoch, self.epoch_blocks = c["step"], c["epoch"], c["epoch_blocks"]
        self.best, self.bad_validations = c["best"], c["bad_validations"]
        self.stopped_early, self.run_id = c["stopped_early"], c["run_id"]
        self.loader.load_state_dict(json.loads(state["loader"]))
        set_rng_state(state["rng"])
        # Same world size: the same total as an uninterrupted run; resharded: recounted for the new size.
        self.total = self._planned_total()
        self.schedule.total = max(self.total, 1)
        self.schedule.set(self.step)

    # -------------------------------------------------------------------------------------- steps
    def epoch_batches(self) -> Iterator[Any]:
        """This epoch's batches (after load_state_dict: from the exact next batch)."""
        return _rng_neutral(iter(self.loader))

    def train_step(self, it: Iterator[Any]) -> float:
        """One optimizer step; returns the batch's mean loss (StopIteration when `it` is done)."""
        if self.pipeline is not None:
            loss, _, _ = self.pipeline.progress(it)
            return float(loss)
        batch = next(it).to(self.env.device)
        self.optimizer.zero_grad()
        loss, _ = self.model(batch)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def split_arrays(self) -> dict[str, Any]:
        """Every split's arrays (read once, for retrieval evaluation and the embedding export)."""
        if self._arrays is None:
            from recsys.evaluate import read_all_splits

            self._arrays = read_all_splits(self.cfg, self.meta)
        return self._arrays

    def _plain(self) -> torch.nn.Module | None:
        """The unsharded model on rank 0 (None elsewhere); collective."""
        from recsys.distributed import gather_state_dict
        from recsys.models.task import plain_model

        state = gather_state_dict(self.model, self.env)
        return plain_model(self.cfg, self.meta, state) if state is not None else None

    def validate(self) -> dict[str, float]:
        """Validation metrics (logged at the current step); a collective, call on every rank."""
        # Building the plain evaluation copy draws from torch's RNG: a validation (which a run cut by
        # max_steps does before its checkpoint) must leave the stream dropout and negatives read alone.
        with torch.random.fork_rng(devices=[]):
            return self._validate()

    def _validate(self) -> dict[str, float]:
        from recsys.distributed import broadcast_object
        from recsys.evaluate import evaluate_retrieval, evaluate_sharded
        from recsys.tracking import mlflow_metrics

        if self.pipeline is not None:
            self.pipeline.detach()  # the sharded modules' own forwards; progress() re-attaches
        ctr = self.train_ctr if self.cfg.model.kind == "dlrm" else None
        m = evaluate_sharded(self.model, self.cfg, self.meta, "val", self.env, ctr)
        m = {k: v for k, v in m.items() if not k.startswith("baseline_")}
        if self.cfg.model.kind != "dlrm" and self.cfg.eval.val_retrieval:
            plain = self._plain()
            if plain is not None:
                rm, _ = evaluate_retrieval(plain, self.cfg, self.meta, self.split_arrays(), "val", False)
                m.update(rm)
            m = broadcast_object(m)
            self.model.train()
        self.tracker.log_metrics(mlflow_metrics("val", m), step=self.step)
        self.job_status.update(self.step, self.total, mlflow_metrics("val", m))
        self.validations.append({"step": float(self.step), **m})
        return m

    def _track_best(self, metrics: dict[str, float]) -> bool:
        """Update the best value and the patience count; True when this validation is the new best."""
        es = self.cfg.train.early_stopping
        if es.metric is None:
            return False
        value = float(metrics[es.metric.removeprefix("val/")])
        sign = 1.0 if self.cfg.best_mode() == "max" else -1.0
        # NaN compares False with everything: as the first best it would stay best forever (and an
        # infinite value is no measurement either).
        finite = math.isfinite(value)
        if not finite and self.env.is_main:
            print(f"recsys: {es.metric} = {value} at step {self.step}: counted as no improvement", flush=True)
        if finite and (self.best is None or sign * (value - self.best["value"]) > es.min_delta):
            # The whole validation rides along (and through checkpoints): it is what the kept state scored.
            validation = {k: float(v) for k, v in metrics.items()}
            self.best = {
                "metric": es.metric,
                "value": value,
                "step": self.step,
                "epoch": self.epoch,
                "validation": validation,
            }
            self.bad_validations = 0
            return True
        self.bad_validations += 1
        if es.patience is not None and self.bad_validations >= es.patience:
            self.stopped_early = True
            if self.env.is_main:
                since = (
                    "no finite value yet"
                    if self.best is None
                    else f"{self.best['value']:.5f} (step {self.best['step']})"
                )
                print(
                    f"recsys: early stop at step {self.step}: {es.metric} has not improved on "
                    f"{since} for {es.patience} validations",
                    flush=True,
                )
        return False

    # --------------------------------------------------------------------------------------- loop
    def _next_stop(self, epoch_end: int) -> int:
        stop = min(epoch_end, self.total)
        for every in (self.cfg.train.val_every_steps, self.cfg.train.checkpoint.every_steps):
            if every:
                stop = min(stop, (self.step // every + 1) * every)
        return stop

    def _log_window(self, force: bool) -> None:
        from recsys.distributed import all_reduce_sum

        if not (force or self.step % self.cfg.train.log_every_steps == 0):
            return
        loss, n, since = self._window
        s, count = all_reduce_sum([loss, float(n)], self.env.device)
        now = time.perf_counter()
        rec = {
            "train/loss": s / max(count, 1.0),  # mean over ranks and steps of batch means
            "train/lr_dense": self.optimizer.param_groups[-1]["lr"],
            "train/samples_per_s": n * self.global_batch / max(now - since, 1e-9),
            "train/epoch": float(self.epoch),
            "train/blocks_left_out_per_epoch": float(self.blocks_left_out),
        }
        self.tracker.log_metrics(rec, step=self.step)
        self.job_status.update(self.step, self.total, rec)
        self.history.append({"step": float(self.step), **rec})
        self._window = (0.0, 0, now)

    def _segment_batches(self, it: Iterator[Any], n: int) -> Iterator[Any]:
        """Up to `n` batches of `it`; fewer when a rank got SIGTERM (every rank stops at the same one,
        at most one batch after the signal: the vote is read a batch after it starts)."""
        from recsys.stop_vote import StopVote

        vote = StopVote(self._control)
        for batch in itertools.islice(it, n):
            if vote.cast(self._guard is not None and self._guard.requested):
                self.preempted = True
                return
            yield batch
        if vote.settle():  # the signal came during the segment's last batch
            self.preempted = True

    def _run_segment(self, it: Iterator[Any], stop: int, bar: _Progress, t0: float, start: int) -> None:
        seg = self._segment_batches(it, stop - self.step)
        while True:
            self.schedule.set(self.step)
            try:
                loss = self.train_step(seg)
            except StopIteration:
                break
            self.step += 1
            self.epoch_blocks += self.blocks_per_step
            total_loss, n, since = self._window
            self._window = (total_loss + loss, n + 1, since)
            bar.update(loss, (self.step - start) * self.global_batch / max(time.perf_counter() - t0, 1e-9))
            self._log_window(force=self.step == self.total)
        if self.step != stop and not self.preempted:
            raise RuntimeError(f"the train loader ended early at step {self.step} (expected {stop})")

    def _save_due(self, epoch_done: bool, improved: bool) -> bool:
        ck = self.cfg.train.checkpoint
        es = self.cfg.train.early_stopping
        if ck.every_steps and self.step % ck.every_steps == 0:
            return True
        if ck.every_epoch and epoch_done:
            return True
        return improved and (ck.keep_best or es.restore_best)

    def save(self, ckpt: Checkpointer) -> None:
        """Checkpoint the whole state at the current step (a drained segment boundary)."""
        meta = {**self.counters(), "loader": self.loader_state(), "fingerprint": self.fingerprint()}
        meta["validation"] = self.validations[-1] if self.validations else None
        meta["provenance"] = self.provenance
        ckpt.save(self.state_dict(), meta)

    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint of this trainer must agree on with the config that resumes it."""
        from recsys.checkpoint import fingerprint

        return fingerprint(self.cfg, {f.name: f.num_embeddings for f in self.meta.sparse_features})

    def _report_left_out(self) -> None:
        """Say how many train blocks each epoch leaves out (or repeats): never silently."""
        n = self.blocks_left_out
        if n and self.env.is_main:
            what = "left out of" if n > 0 else "repeated in"
            print(
                f"recsys: {abs(n)} of {self.train_blocks} train blocks are {what} each "
                f"epoch (whole global batches of {self.blocks_per_step} blocks; the shuffle changes which)",
                flush=True,
            )

    def fit(self, ckpt: Checkpointer) -> float:
        """Train until the planned total, max_steps, early stopping or SIGTERM (then `preempted`, with a
        checkpoint of the step reached); returns the training seconds."""
        with PreemptionGuard(self.cfg.train.checkpoint.preempt_grace_s) as self._guard:
            try:
                return self._fit(ckpt)
            except Exception as e:
                # Say where (a timed-out collective's traceback does not): the work since the last
                # checkpoint is what a restart trains again.
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                print(
                    f"recsys: rank {self.env.rank}: training failed after {self.step} complete steps "
                    f"({type(e).__name__}: {first})",
                    file=sys.stderr,
                    flush=True,
                )
                raise
            finally:
                self._guard = None

    def _stop_for_preemption(self, ckpt: Checkpointer) -> None:
        """Checkpoint the drained step reached after SIGTERM and wait until it is committed."""
        self.save(ckpt)
        ckpt.wait()
        if self.env.is_main:
            since = self._guard.seconds_since() if self._guard is not None else None
            after = f", {since:.1f} s after SIGTERM" if since is not None else ""
            print(f"recsys: preempted at step {self.step}: checkpoint written{after}", flush=True)

    def _fit(self, ckpt: Checkpointer) -> float:
        self._report_left_out()
        self.model.train()
        start, t0 = self.step, time.perf_counter()
        self._window = (0.0, 0, t0)
        bar = _Progress(self.total, self.step, self.env.is_main)
        val_every = self.cfg.train.val_every_steps
        while self.step < self.total and not self.stopped_early and not self.preempted:
            it = self.epoch_batches()
            epoch_end = min(self.step + self.steps_left_in_epoch(), self.total)
            while self.step < epoch_end and not self.stopped_early:
                stop = self._next_stop(epoch_end)
                self._run_segment(it, stop, bar, t0, start)
                if self.preempted and self.step < stop:  # stopped mid-segment: no boundary work is due
                    self._stop_for_preemption(ckpt)
                    break
                at_end = self.step == epoch_end  # the epoch's end, or max_steps within it
                if self.steps_left_in_epoch() == 0:
                    self.epoch, self.epoch_blocks = self.epoch + 1, 0
                improved = False
                if at_end or (val_every and self.step % val_every == 0):
                    improved = self._track_best(self.validate())
                if self._save_due(at_end, improved):
                    self.save(ckpt)
                if self.preempted:  # the signal came with the segment's last batch
                    self._stop_for_preemption(ckpt)
                    break
        bar.close()
        if self.pipeline is not None:
            self.pipeline.detach()
        self.steps_this_run = self.step - start
        return time.perf_counter() - t0

    # --------------------------------------------------------------------------------------- test
    def tested_validation(self, restored_step: int | None) -> dict[str, float]:
        """Validation metrics of the state test() evaluates: the restored best's, else the last's.

        This is the value `recsys tune` optimises and the results table (Katib's collector) shows.
        """
        if restored_step is not None and self.best is not None:
            fallback = {str(self.best["metric"]).removeprefix("val/"): float(self.best["value"])}
            return dict(self.best.get("validation") or fallback)  # older checkpoints: no "validation"
        last = self.validations[-1] if self.validations else {}
        return {k: v for k, v in last.items() if k != "step"}

    def restore_best(self, ckpt: Checkpointer) -> int | None:
        """Load the best checkpoint's model (train.early_stopping.restore_best); returns its step."""
        from recsys.distributed import broadcast_object

        es = self.cfg.train.early_stopping
        if es.metric is None or not es.restore_best or self.best is None or self.best["step"] == self.step:
            return None
        info = broadcast_object(ckpt.find(int(self.best["step"])) if self.env.is_main else None)
        if info is None:
            raise RuntimeError(f"the best checkpoint (step {self.best['step']}) is missing in {ckpt.run_dir}")
        state = {"model": self.model.state_dict()}
        ckpt.load(info, state)
        self.model.load_state_dict(state["model"])
        if self.env.is_main:
            print(
                f"recsys: restored the best state: step {info.step}, {es.metric} = {self.best['value']:.5f}",
                flush=True,
            )
        return info.step

    def test(self) -> tuple[dict[str, float], dict[str, float], torch.nn.Module | None]:
        """(metrics, baselines, plain model on rank 0) of the test split; a collective."""
        from recsys.distributed import broadcast_object
        from recsys.evaluate import evaluate_retrieval, evaluate_sharded

        cfg = self.cfg
        metrics: dict[str, float] = {}
        baselines: dict[str, float] = {}
        need_plain = cfg.model.kind != "dlrm" or (cfg.tracking.enabled and cfg.tracking.log_model)
        plain = self._plain() if need_plain else None
        if cfg.model.kind == "dlrm":
            m = evaluate_sharded(self.model, cfg, self.meta, "test", self.env, self.train_ctr)
            metrics = {k: v for k, v in m.items() if not k.startswith("baseline_")}
            baselines = {k.removeprefix("baseline_"): v for k, v in m.items() if k.startswith("baseline_")}
            bayes = (self.meta.synthetic or {}).get("bayes_auc")
            if bayes is not None:
                baselines["bayes_auc"] = float(bayes)  # type: ignore[arg-type]
        else:
            metrics["loss"] = evaluate_sharded(self.model, cfg, self.meta, "test", self.env, None)["loss"]
            if plain is not None:
                rm, base = evaluate_retrieval(plain, cfg, self.meta, self.split_arrays(), "test")
                metrics.update(rm)
                baselines.update(base)
        metrics, baselines = broadcast_object((metrics, baselines))
        return metrics, baselines, plain

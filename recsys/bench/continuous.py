"""`recsys bench continuous`: what continuous training buys on the real MovieLens-100K, by time window.

The ratings are cut by timestamp into `windows` consecutive windows of equal size (the last one is
test only). Each window is prepared on its own (`data.window.since/until`), its vocabularies extending
the window before it (`data.window.previous`), and split at random into train / val / test (a window's
test part is never trained on by any step). At every step t (t = 1 … windows − 1) three models are
scored on window t + 1, which none of them trained on, by the promotion gate's own protocol
(`recsys.promotion.window_eval.score`: the window's test split, each user's items in the window's train
split excluded, rows mapped to the model's vocabulary by raw id):

- **scratch**: random init, trained on the train splits of windows 1 … t (`data.train_dirs`);
- **warm**: `train.init_from` the warm model of step t − 1 (step 1: the scratch model), trained on
  window t alone;
- **stale**: the warm model of step t − 1, not retrained (what serving holds until a retrain lands).

Two populations are scored. *All users* of window t + 1: on ML-100K most of them are new (its users
rate in one burst), so they are cold for every model and get the same popularity list, which hides
most differences. *Returning users* (`returning_*`): those already in window t, whom warm and scratch
know; the stale model does not know those first seen in window t, which is what staleness costs.

Every run uses the shipped `movielens_100k` settings, early stopping on its newest window's val split
(best state restored); nothing is chosen on the windows the figures are read from. Steps whose next
window is t + 1 < windows are validation figures; the last step's is the test figure.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bench.quiet import quiet

CONFIG = "movielens_100k"
METRICS = ("ndcg@10", "recall@10")


@dataclass
class Run:
    """One trained model of the bench: its MLflow run and the seconds its training loop took."""

    run_id: str
    seconds: float
    steps: int


def window_bounds(timestamps: np.ndarray, windows: int) -> list[int]:
    """`windows` + 1 epoch-second bounds cutting the sorted timestamps into equal-count windows
    (window k is [bounds[k], bounds[k + 1])); ties stay in one window, so counts differ by the ties."""
    ts = np.sort(timestamps.astype(np.int64))
    cuts = [int(ts[len(ts) * k // windows]) for k in range(windows)]
    bounds = [*cuts, int(ts[-1]) + 1]
    if len(set(bounds)) != len(bounds):
        raise ValueError(f"{windows} windows: too many for {len(ts)} timestamps (two bounds coincide)")
    return bounds


class Bench:
    """Prepares the windows and trains/scores the bench's models inside one scratch folder."""

    def __init__(self, work: Path, data: Path, epochs: int | None) -> None:
        from recsys.bench.quality import source_overrides

        self.work, self.epochs = work, epochs
        work.mkdir(parents=True, exist_ok=True)
        self._scored: dict[int, tuple[Any, Any]] = {}  # window → (it, its returning-user cut)
        self.source = source_overrides(data, CONFIG)
        self.uri = f"sqlite:///{work / 'mlflow.db'}"

    def _sets(self, window: int, name: str) -> list[str]:
        sets = [
            *self.source,
            f"data.prepared_dir={self.folder(window)}",
            "data.split.mode=random",
            "data.split.val_fraction=0.1",
            "data.split.test_fraction=0.2",
            f"train.checkpoint.dir={self.work / 'checkpoints' / name}",
            "train.checkpoint.keep_last=1",
            "eval.ks=[10]",
            f"tracking.uri={self.uri}",
            "tracking.experiment=bench-continuous",
            f"tracking.run_name={name}",
        ]
        return sets + ([f"train.epochs={self.epochs}"] if self.epochs else [])

    def folder(self, window: int) -> Path:
        """The prepared folder of window `window` (1-based)."""
        return self.work / f"window-{window}"

    def prepare(self, window: int, since: int, until: int) -> None:
        """`recsys data prepare` of one window, extending the previous window's vocabularies."""
        from recsys.config import load_config
        from recsys.data.prepare import prepare

        sets = self._sets(window, "prepare") + [f"data.window.since={since}", f"data.window.until={until}"]
        if window > 1:
            sets.append(f"data.window.previous={self.folder(window - 1)}")
        with self._quiet():
            prepare(load_config(CONFIG, sets), overwrite=True)

    def train(self, window: int, name: str, init_from: str | None) -> Run:
        """Train on window `window` (from `init_from`'s weights), or from scratch on windows 1 … window."""
        from recsys.config import load_config
        from recsys.train import train

        sets = self._sets(window, name)
        if init_from:
            sets.append(f"train.init_from={init_from}")
        else:
            earlier = ",".join(str(self.folder(w)) for w in range(1, window))
            sets.append(f"data.train_dirs=[{earlier}]")
        with self._quiet():
            r = train(load_config(CONFIG, sets), resume="never")
        assert r.run_id is not None
        return Run(r.run_id, r.train_seconds, r.steps)

    def score(self, run: Run, window: int) -> dict[str, float]:
        """The gate's metrics of `run` on the test split of window `window`: over all its users, and
        (`returning_*`) over the users already in the window before it (`returning_users` of them)."""
        from recsys.promotion.window_eval import open_logged_run, open_window, score

        if window not in self._scored:  # each window is read once, whatever the models scored on it
            win = open_window(self.folder(window))
            self._scored[window] = (win, returning_users(win, self.known_users(window - 1)))
        win, back = self._scored[window]
        with tempfile.TemporaryDirectory() as tmp, self._quiet():
            logged = open_logged_run(run.run_id, self.uri, Path(tmp))
            out = {m: v for m, v in score(logged, win, METRICS[0], "test").items() if m in METRICS}
            again = score(logged, back, METRICS[0], "test")
        return {**out, **{f"returning_{m}": again[m] for m in METRICS}, "returning_users": back.users}

    def known_users(self, window: int) -> int:
        """User rows of window `window`'s vocabulary: the users of windows 1 … window (rows are stable)."""
        return known_user_rows(self.folder(window))

    @contextlib.contextmanager
    def _quiet(self) -> Any:
        # The trainer's plan, tables and progress bars would bury the bench's table: they go to a log.
        with quiet(self.work / "train.log"):
            yield


@dataclass
class _Returning:
    """A window whose test split keeps only the rows of returning users."""

    path: Path
    meta: Any
    arrays: dict[str, dict[str, np.ndarray]]
    users: int


def known_user_rows(folder: Path) -> int:
    """User rows (OOV included) of a prepared folder's vocabulary; with append-only vocabularies, the
    rows below it are the users of that window and every one before it."""
    from recsys.data.metadata import read_metadata

    meta = read_metadata(folder)
    return meta.sparse_features[meta.sparse_index(meta.user_feature or "")].num_embeddings


def returning_users(window: Any, known_rows: int) -> Any:
    """`window` with its test split cut to the users whose row is below `known_rows` (and not OOV):
    with append-only vocabularies, exactly the users the window before it already had."""
    meta = window.meta
    user = window.arrays["test"]["sparse"][:, meta.sparse_index(meta.user_feature or "")]
    keep = (user > 0) & (user < known_rows)
    arrays = {**window.arrays, "test": {k: v[keep] for k, v in window.arrays["test"].items()}}
    return _Returning(window.path, meta, arrays, int(np.unique(user[keep]).size))


def _row(step: int, windows: int, way: str, m: dict[str, float], run: Run | None) -> str:
    part = "test" if step == windows - 1 else "val"
    secs = f"{run.seconds:8.1f} {run.steps:6d}" if run else f"{'-':>8} {'-':>6}"
    return (
        f"{step:4d} {part:>5} {way:>8} {m['ndcg@10']:9.4f} {m['recall@10']:9.4f} "
        f"{m['returning_ndcg@10']:9.4f} {m['returning_recall@10']:9.4f} {m['returning_users']:6d} {secs}"
    )


HEADER = (
    f"{'step':>4} {'part':>5} {'model':>8} {'nDCG@10':>9} {'Recall@10':>9} {'ret nDCG':>9} {'ret Rec':>9} "
    f"{'ret u':>6} {'train s':>8} {'steps':>6}"
)


def _summary(results: list[dict[str, Any]]) -> list[str]:
    """Warm vs scratch (quality and compute) and what staleness costs, over all steps >= 2."""
    later = [r for r in results if r["step"] >= 2]
    if not later:
        return []
    lines = []
    for title, key in (("all users", "ndcg@10"), ("returning users", "returning_ndcg@10")):
        mean = {w: float(np.mean([r[w][key] for r in later])) for w in ("warm", "scratch", "stale")}
        lines.append(
            f"{title}, steps 2-{results[-1]['step']}: mean nDCG@10 warm {mean['warm']:.4f}, scratch "
            f"{mean['scratch']:.4f}, stale {mean['stale']:.4f}: warm/scratch {mean['warm'] / mean['scratch']:.3f}x "
            f"(aim >= 0.98); staleness costs {1 - mean['stale'] / mean['warm']:.1%} of warm's"
        )
    secs = {w: float(np.sum([r[f"{w}_run"].seconds for r in later])) for w in ("warm", "scratch")}
    steps = {w: int(np.sum([r[f"{w}_run"].steps for r in later])) for w in ("warm", "scratch")}
    lines.append(
        f"warm trains in {secs['warm'] / secs['scratch']:.0%} of scratch's training seconds (aim <= 40%) and "
        f"{steps['warm'] / steps['scratch']:.0%} of its steps (same batch size: its samples)"
    )
    last = results[-1]
    lines.append(
        f"test (window {last['step'] + 1}), returning users: nDCG@10 warm {last['warm']['returning_ndcg@10']:.4f}, "
        f"scratch {last['scratch']['returning_ndcg@10']:.4f}, stale {last['stale']['returning_ndcg@10']:.4f}"
    )
    return lines


def bench_continuous(windows: int = 6, epochs: int | None = None, work: Path | None = None) -> list[dict]:
    """Prepare `windows` time windows of ML-100K, train warm / scratch at each step, score all three ways."""
    from recsys.bench.quality import fetch_ml100k, ml100k_original_layout

    data = fetch_ml100k()
    stamps = np.loadtxt(ml100k_original_layout(data) / "u.data", dtype=np.int64, usecols=3)
    bounds = window_bounds(stamps, windows)
    scratch_dir = tempfile.TemporaryDirectory(prefix="bench-continuous-") if work is None else None
    root = work or Path(scratch_dir.name)  # type: ignore[union-attr]
    bench = Bench(root, data, epochs)
    t0 = time.monotonic()
    for w in range(1, windows + 1):
        bench.prepare(w, bounds[w - 1], bounds[w])
    print(f"bench continuous: ML-100K in {windows} windows by timestamp (bounds {bounds}); prepared in "
          f"{time.monotonic() - t0:.0f} s; scored on each next window's test split")  # fmt: skip
    print(HEADER)
    results: list[dict[str, Any]] = []
    warm_prev: Run | None = None
    for t in range(1, windows):
        scratch = bench.train(t, f"scratch-{t}", None)
        warm = bench.train(t, f"warm-{t}", warm_prev.run_id) if warm_prev else scratch
        res: dict[str, Any] = {"step": t, "scratch": bench.score(scratch, t + 1), "scratch_run": scratch}
        res["warm"], res["warm_run"] = (bench.score(warm, t + 1) if warm_prev else res["scratch"]), warm
        lines = [_row(t, windows, "scratch", res["scratch"], scratch)]
        if warm_prev:
            res["stale"] = bench.score(warm_prev, t + 1)
            lines += [
                _row(t, windows, "warm", res["warm"], warm),
                _row(t, windows, "stale", res["stale"], None),
            ]
        print("\n".join(lines), flush=True)
        results.append(res)
        warm_prev = warm
    for line in _summary(results):
        print(line)
    if scratch_dir is not None:
        scratch_dir.cleanup()
    return results

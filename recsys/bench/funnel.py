"""`recsys bench funnel`: retrieval alone vs retrieve → rank on MovieLens-100K test, N chosen on val.

The retriever is the shipped `movielens_100k_recbole` Two-Tower (its random 80/10/10 split, seed 0).
The ranker is `movielens_100k_candidate_ranker`: DCN-v2 trained on that run's own top-N, cross-fitted
(recsys/retrieval/candidates.py). The fold retrievers are trained once and reused for every N.
Every (N, ranker setting) is trained and scored on val (nDCG@10 of the re-ranked top-N, the protocol
of `recsys evaluate --ranker-run-id`); test is scored once, for the val-chosen pair, beside retrieval
alone. The sampled-negative ranker (`movielens_100k_ranker`, uniform negatives) is scored the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

RETRIEVER = "movielens_100k_recbole"
RANKER = "movielens_100k_candidate_ranker"
UNIFORM = "movielens_100k_ranker"
#: Candidates per user tried on val (each is also the ranker's training depth).
N_GRID = (20, 50, 100)
#: Ranker settings tried on val for each N: the shipped config (val's choice in the last full run:
#: dim 32, dense lr 1e-3) and the smaller, faster-learning one it replaced.
RANKER_GRID: list[dict[str, Any]] = [
    {},
    {"model.embedding_dim": 16, "model.dlrm.dense_arch_layers": [16], "train.dense_optimizer.lr": 0.003},
]
KEY = "ndcg@10"


def _quiet(work: Path, fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call `fn` with its tables and progress bars sent to work/train.log."""
    from recsys.bench.quiet import quiet

    with quiet(work / "train.log"):
        return fn(*args, **kwargs)


def bench_funnel(quick: bool = False) -> dict[str, dict[str, float]]:
    """Run the benchmark; print and return {row name: metrics} (test rows and the val grid)."""
    from recsys.bench.quality import fetch_ml100k, source_overrides
    from recsys.config import load_config
    from recsys.data.prepare import prepare
    from recsys.retrieval.candidates import build_candidates
    from recsys.retrieval.funnel import evaluate_funnel
    from recsys.train import train

    os.environ.setdefault("TQDM_DISABLE", "1")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.0f}s] {msg}", flush=True)

    data = fetch_ml100k()
    work = Path(tempfile.mkdtemp(prefix="bench-funnel-"))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    common = [*source_overrides(data, RETRIEVER), f"tracking.uri={uri}", "tracking.experiment=bench-funnel"]
    if quick:
        common += ["train.epochs=1"]
    tt_cfg = load_config(RETRIEVER, [*common, f"data.prepared_dir={work / 'tt'}",
                                     f"train.checkpoint.dir={work / 'ckpt-tt'}"])  # fmt: skip
    _quiet(work, prepare, tt_cfg, overwrite=True)
    tt = _quiet(work, train, tt_cfg, resume="never").run_id
    log(f"retriever {RETRIEVER}: run {tt}")
    n_grid, grid = ((20,), RANKER_GRID[:1]) if quick else (N_GRID, RANKER_GRID)
    folds: list[str] | None = None
    val: dict[tuple[int, int], float] = {}
    rows: dict[str, dict[str, float]] = {}
    runs: dict[tuple[int, int], str] = {}
    for n in n_grid:
        base = [*common, f"data.candidates.top_n={n}", f"data.prepared_dir={work / f'cand-{n}'}"]
        cfg = load_config(RANKER, base)
        meta = _quiet(work, build_candidates, cfg, tt, uri, folds, overwrite=True)
        folds = list(meta.label["fold_run_ids"])  # type: ignore[arg-type]
        for g, hp in enumerate(grid):
            sets = [
                *base,
                f"train.checkpoint.dir={work / f'ckpt-{n}-{g}'}",
                *(f"{k}={v}" for k, v in hp.items()),
            ]
            rk = _quiet(work, train, load_config(RANKER, sets), resume="never").run_id
            m = evaluate_funnel(tt, rk, uri, (n,), "val", log=False)
            val[(n, g)], runs[(n, g)] = m[f"rank_n{n}/{KEY}"], rk
            rows[f"val N={n} {hp or 'shipped'}"] = {"retrieval": m[f"retrieval/{KEY}"], "ranked": val[(n, g)]}
            log(f"  N={n} {hp or 'shipped'}: val {KEY} retrieval {m[f'retrieval/{KEY}']:.4f}, "
                f"ranked {val[(n, g)]:.4f} (ranker run {rk})")  # fmt: skip
    n, g = max(val, key=val.__getitem__)
    _tag_choice(uri, runs[(n, g)], n)
    test = evaluate_funnel(tt, runs[(n, g)], uri, (n,), "test")
    rows["test retrieval only"] = {k.split("/")[1]: v for k, v in test.items() if k.startswith("retrieval/")}
    rows[f"test ranked (N={n})"] = {
        k.split("/")[1]: v for k, v in test.items() if k.startswith(f"rank_n{n}/")
    }
    uniform = _uniform_ranker(work, common, tt, uri, n, quick)
    rows[f"test uniform-negative ranker (N={n})"] = uniform
    _print(rows, n, grid[g], time.perf_counter() - t0)
    shutil.rmtree(work, ignore_errors=True)  # data, checkpoints and the runs' store: the figures are printed
    return rows


def _tag_choice(uri: str, ranker_run_id: str, n: int) -> None:
    """Record val's N on the chosen ranker run: `recsys serve build --ranker-run-id` defaults to it."""
    import mlflow

    from recsys.retrieval.serve_two_stage import CANDIDATES_TAG

    mlflow.MlflowClient(uri).set_tag(ranker_run_id, CANDIDATES_TAG, str(n))


def _uniform_ranker(
    work: Path, common: list[str], tt: str, uri: str, n: int, quick: bool
) -> dict[str, float]:
    """Test metrics of the shipped sampled-negative ranker re-ranking the same top-N (the "before")."""
    from recsys.config import load_config
    from recsys.data.prepare import prepare
    from recsys.retrieval.funnel import evaluate_funnel
    from recsys.train import train

    sets = [*common, f"data.prepared_dir={work / 'uniform'}", f"train.checkpoint.dir={work / 'ckpt-u'}"]
    cfg = load_config(UNIFORM, sets)
    _quiet(work, prepare, cfg, overwrite=True)
    rk = _quiet(work, train, cfg, resume="never").run_id
    out = evaluate_funnel(tt, rk, uri, (n,), "test", log=False)
    return {k.split("/")[1]: v for k, v in out.items() if k.startswith(f"rank_n{n}/")}


def _print(rows: dict[str, dict[str, float]], n: int, hp: dict[str, Any], seconds: float) -> None:
    """The val grid and the test table."""
    print(f"\nMovieLens-100K, random 80/10/10 split (seed 0); retriever {RETRIEVER}; ranker {RANKER} "
          f"trained on its cross-fitted top-N; val chose N={n}, {hp or 'shipped settings'}")  # fmt: skip
    for name, m in rows.items():
        if name.startswith("val"):
            print(f"  {name:<58} retrieval {m['retrieval']:.4f}  ranked {m['ranked']:.4f}")
    base = rows["test retrieval only"]
    print(f"  {'test':<40} {'nDCG@10':>9} {'Recall@10':>10} {'vs retrieval':>13}")
    for name, m in rows.items():
        if name.startswith("test"):
            gain = (m[KEY] / base[KEY] - 1) * 100
            print(f"  {name[5:]:<40} {m[KEY]:>9.4f} {m['recall@10']:>10.4f} {gain:>+12.1f}%")
    print(f"done in {seconds:.0f} s")

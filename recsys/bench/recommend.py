"""`make bench-recommend` / `recsys bench recommend`: top-100 retrieval speed, exact and IVF, per core.

Prints figures; asserts nothing. Steps (generation is not timed):
  data      synthetic *clustered* embeddings shaped like trained Two-Tower ones (see
            `clustered_embeddings`): random Gaussian vectors are the worst case for IVF, since they
            have no cluster structure for its lists to follow;
  exact     faiss IndexFlatIP top-100 with 1 and 2 OpenMP threads (faiss.omp_set_num_threads), the
            timed users in 3 parts, each searched on 1 then 2 threads (medians reported);
  ceiling   this machine's sgemm GFLOP/s (torch, same thread count), measured right before each of
            those searches so both see the same load, as exact-search users/s = GFLOP/s / (2 × items
            × dim), for a square GEMM (peak) and for the shape exact search multiplies (queries × dim
            by dim × 1024-item blocks);
  ivf       IndexIVFFlat (k-means on a sample), nprobe swept; recall@100 against the exact results of
            the same users; the smallest nprobe with recall ≥ 0.95 is timed with 1 and 2 threads.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

K = 100
TARGET_RECALL = 0.95
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)


def clustered_embeddings(
    items: int,
    users: int,
    dim: int = 64,
    clusters: int = 2000,
    rank: int = 24,
    spread: float = 0.6,
    noise: float = 0.15,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Unit-norm (item [items, dim], user [users, dim]) float32 vectors with trained-like structure.

    Trained towers put items of one taste close together, use a low-rank part of the space and are
    L2-normalised (softmax loss). So: `clusters` centres in a random `rank`-dim subspace, cluster sizes
    Zipf-like (a few big genres, a long tail); each vector = its centre + `spread` × in-subspace
    Gaussian + `noise` × full-space Gaussian, normalised. Users come from the same mixture.
    """
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, rank)))[0].T.astype(np.float32)  # [rank, dim]
    centres = rng.standard_normal((clusters, rank)).astype(np.float32)
    weight = 1.0 / np.arange(1, clusters + 1) ** 0.7
    weight /= weight.sum()

    def draw(n: int) -> np.ndarray:
        z = rng.choice(clusters, n, p=weight)
        latent = centres[z] + spread * rng.standard_normal((n, rank), dtype=np.float32)
        x = latent @ basis + noise * rng.standard_normal((n, dim), dtype=np.float32)
        return np.ascontiguousarray(x / np.linalg.norm(x, axis=1, keepdims=True), np.float32)

    return draw(items), draw(users)


def _timed(fn: Any, *args: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t


def sgemm_gflops(m: int, k: int, n: int, threads: int, seconds: float = 2.0) -> float:
    """Median GFLOP/s of float32 [m, k] @ [k, n] with torch on `threads` threads."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(m, k), torch.randn(k, n)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)  # warm-up
        rates, start = [], time.perf_counter()
        while time.perf_counter() - start < seconds or len(rates) < 3:
            _, dt = _timed(torch.mm, a, b)
            rates.append(2 * m * k * n / dt / 1e9)
        return float(np.median(rates))
    finally:
        torch.set_num_threads(old)


def _search(faiss: Any, index: Any, queries: np.ndarray, threads: int) -> tuple[np.ndarray, float]:
    """(top-K item ids, users/s) of one search of `queries` on `threads` threads."""
    faiss.omp_set_num_threads(threads)
    (_, ids), dt = _timed(index.search, queries, K)
    return ids, len(queries) / dt


def _one_vs_two(
    faiss: Any, index: Any, queries: np.ndarray, chunks: int = 3
) -> tuple[np.ndarray, float, float]:
    """(top-K ids, median users/s on 1 thread, on 2): the queries in `chunks` parts, each searched on
    1 then 2 threads, so both counts see the same moments of a shared, noisy machine."""
    ids, rates = [], {1: [], 2: []}
    for part in np.array_split(queries, chunks):
        for threads in (1, 2):
            found, rate = _search(faiss, index, part, threads)
            rates[threads].append(rate)
        ids.append(found)
    return np.concatenate(ids), float(np.median(rates[1])), float(np.median(rates[2]))


def _exact(
    faiss: Any, index: Any, queries: np.ndarray, dim: int, chunks: int = 3
) -> tuple[np.ndarray, dict[int, dict[str, float]]]:
    """Exact top-K ids, and per thread count the medians of users/s and of sgemm GFLOP/s (square and
    search-shaped) measured right before each search part, so search and ceiling see the same load."""
    shapes = {"square": (2048, 2048, 2048), "search": (min(len(queries), 4096), dim, 1024)}
    stats: dict[int, dict[str, list[float]]] = {t: {"rate": [], "square": [], "search": []} for t in (1, 2)}
    ids = []
    for part in np.array_split(queries, chunks):
        for threads in (1, 2):
            for name, shape in shapes.items():
                stats[threads][name].append(sgemm_gflops(*shape, threads=threads, seconds=0.4))
            found, rate = _search(faiss, index, part, threads)
            stats[threads]["rate"].append(rate)
        ids.append(found)
    med = {t: {k: float(np.median(v)) for k, v in st.items()} for t, st in stats.items()}
    return np.concatenate(ids), med


def _print_exact(med: dict[int, dict[str, float]], items: int, dim: int, queries: int) -> None:
    per_user = 2.0 * items * dim  # FLOPs of one user's exact scores
    print(
        f"\nexact (IndexFlatIP) beside the ceiling: torch sgemm GFLOP/s measured between the searches, as "
        f"users/s = GFLOP/s / (2 x {items:,} x {dim}); sq = square 2048^3, shape = "
        f"{min(queries, 4096)}x{dim} @ {dim}x1024 (what exact search multiplies)"
    )
    print("  threads    users/s   per core   GFLOP/s sq / shape   ceiling users/s sq / shape   exact/ceiling")
    for t, m in med.items():
        c_sq, c_sh = m["square"] * 1e9 / per_user, m["search"] * 1e9 / per_user
        print(
            f"  {t:7d} {m['rate']:10,.0f} {m['rate'] / t:10,.0f}   {m['square']:7.1f} / {m['search']:6.1f}"
            f"   {c_sq:13,.0f} / {c_sh:6,.0f}   {m['rate'] / c_sq:5.0%} / {m['rate'] / c_sh:4.0%}"
        )
    print(f"  2-thread scaling {med[2]['rate'] / med[1]['rate']:.2f}x")


def _ivf(
    faiss: Any, items: np.ndarray, queries: np.ndarray, exact_ids: np.ndarray, exact: tuple[float, float]
) -> None:
    """Build the IVF index `recsys index build --kind ivf` builds, sweep nprobe, time the chosen one."""
    from recsys.retrieval.index import IndexParams, default_nlist, make_faiss_index, recall_at_k

    params = IndexParams("ivf", nlist=default_nlist(len(items)))
    faiss.omp_set_num_threads(2)
    index, dt = _timed(make_faiss_index, items, params)
    print(
        f"\nivf (IndexIVFFlat): nlist {params.nlist} (~4·sqrt(items)), k-means on 64 items per list + add "
        f"{dt:.1f} s (2 threads)"
    )
    print("  nprobe   recall@100   users/s (2 thr)   speed-up vs exact")
    chosen = None
    for nprobe in NPROBES:
        index.nprobe = nprobe
        ids, rate = _search(faiss, index, queries, 2)
        recall = recall_at_k(ids, exact_ids)
        print(f"  {nprobe:6d}   {recall:10.4f}   {rate:15,.0f}   {rate / exact[1]:8.1f}x")
        if recall >= TARGET_RECALL:
            chosen = (nprobe, recall, rate)
            break
    if chosen is None:
        print(f"  no nprobe up to {NPROBES[-1]} reached recall@100 {TARGET_RECALL}")
        return
    nprobe, recall, _ = chosen
    index.nprobe = nprobe
    _, rate1, rate2 = _one_vs_two(faiss, index, queries)
    print(
        f"  chosen nprobe {nprobe}: recall@100 {recall:.4f}; {rate1:,.0f} users/s on 1 thread, "
        f"{rate2:,.0f} on 2 ({rate2 / 2:,.0f} per core); {rate1 / exact[0]:.1f}x exact on 1 thread, "
        f"{rate2 / exact[1]:.1f}x on 2"
    )


def bench_recommend(
    items: int = 1_000_000, queries: int = 10_000, users: int = 100_000, dim: int = 64
) -> None:
    """Run the retrieval benchmark and print its figures."""
    from recsys.retrieval.index import import_faiss

    faiss = import_faiss()
    cores = len(os.sched_getaffinity(0))
    print(
        f"bench-recommend: {items:,} items x dim {dim}, {users:,} users, top-{K}; faiss {faiss.__version__}, "
        f"{cores} cores, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}"
    )
    (item_emb, user_emb), dt = _timed(clustered_embeddings, items, users, dim)
    print(
        f"data: clustered (trained-like, not random) unit vectors: 2000 Zipf-sized clusters in a rank-24 "
        f"subspace + noise, users from the same mixture ({dt:.1f} s); timing {queries:,} of the {users:,} users"
    )
    q = user_emb[:queries]
    index = faiss.IndexFlatIP(dim)
    index.add(item_emb)
    exact_ids, med = _exact(faiss, index, q, dim)
    _print_exact(med, items, dim, queries)
    print(f"  all {users:,} users at 2 threads: ~{users / med[2]['rate']:,.0f} s")
    rate1, rate2 = med[1]["rate"], med[2]["rate"]
    _ivf(faiss, item_emb, q, exact_ids, (rate1, rate2))
    bench_batch(min(items, 200_000), min(queries, 10_000), dim)
    print(
        "\nusers/s are medians of 3 interleaved parts of the timed users (1 then 2 threads each); on a "
        "shared machine another job's load shows as 2-thread scaling below 2x"
    )


# ------------------------------------------------------------------------------ batch: 1 vs 2 ranks
def _rank_worker(
    items: np.ndarray, users: np.ndarray, seen_per_user: int, part: slice, barrier: Any
) -> float:
    """One rank of a batch run: the Retriever's per-user code (exact index, seen items removed) on
    its slice of the users, one faiss thread; returns the seconds from the common start."""
    from recsys.retrieval.index import build_index, import_faiss
    from recsys.retrieval.recommend import Retriever
    from recsys.retrieval.runs import Embeddings

    import_faiss().omp_set_num_threads(1)
    n_items, n_users = len(items), len(users)
    rng = np.random.default_rng(0)
    indptr = np.arange(n_users + 1, dtype=np.int64) * seen_per_user
    seen = (indptr, rng.integers(0, n_items, n_users * seen_per_user).astype(np.int64))
    ids = np.array([f"u{j}" for j in range(n_users)], dtype=object)
    emb = Embeddings(ids, np.arange(1, n_users + 1), users)
    index = build_index(items, [f"i{j}" for j in range(n_items)])
    ret = Retriever(None, None, "", emb, index, ("train",), seen, np.arange(n_items))  # type: ignore[arg-type]
    mine = list(ids[part])
    ret.recommend(mine[:1], K)  # warm-up: pyarrow's lazy imports are not part of the rate
    barrier.wait()  # ranks start together, after their setup (a batch run's MLflow reads are not timed)
    t0 = time.perf_counter()
    ret.recommend(mine, K)
    return time.perf_counter() - t0


def _ranks_rate(items: np.ndarray, users: np.ndarray, ranks: int, seen_per_user: int) -> float:
    """Users/s of `ranks` spawned processes, each taking a contiguous slice (the slowest rank counts)."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    from recsys.retrieval.batch import partition

    ctx = mp.get_context("spawn")  # no fork after OpenMP threads have started
    with ctx.Manager() as manager, ProcessPoolExecutor(ranks, mp_context=ctx) as pool:
        barrier = manager.Barrier(ranks)
        futures = [
            pool.submit(_rank_worker, items, users, seen_per_user, partition(len(users), ranks, r), barrier)
            for r in range(ranks)
        ]
        seconds = [f.result() for f in futures]
    return len(users) / max(seconds)


def bench_batch(
    items: int = 200_000, users: int = 10_000, dim: int = 64, reps: int = 3
) -> tuple[float, float]:
    """Batch inference (`recsys recommend` under torchrun) on 1 vs 2 ranks: print and return the median
    users/s of each, 1- and 2-rank runs interleaved `reps` times."""
    cores = len(os.sched_getaffinity(0))
    item_emb, user_emb = clustered_embeddings(items, users, dim, seed=1)
    print(
        f"\nbatch inference (Retriever.recommend per rank, exact index, 20 seen items per user removed, "
        f"1 faiss thread per rank): {items:,} items x dim {dim}, {users:,} users, top-{K}; {cores} cores"
    )
    rates: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(reps):
        for ranks in (1, 2):
            rates[ranks].append(_ranks_rate(item_emb, user_emb, ranks, 20))
    r1, r2 = float(np.median(rates[1])), float(np.median(rates[2]))
    print(f"  1 rank  {r1:10,.0f} users/s   (runs: {', '.join(f'{r:,.0f}' for r in rates[1])})")
    print(f"  2 ranks {r2:10,.0f} users/s   (runs: {', '.join(f'{r:,.0f}' for r in rates[2])})")
    where = "" if cores >= 2 else f"; only {cores} core(s) here: 2 ranks cannot beat 1"
    print(f"  speed-up {r2 / r1:.2f}x (aim >= 1.7x where 2 cores are free){where}")
    return r1, r2

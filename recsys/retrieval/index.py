"""Item embeddings → a FAISS inner-product index saved with the raw item ids.

Kinds (all inner product, the Two-Tower's score):
  flat  IndexFlatIP: exact, the default; search cost = items × dim per user.
  ivf   IndexIVFFlat: k-means into `nlist` lists, search `nprobe` of them; approximate.
  hnsw  IndexHNSWFlat: a graph with `m` links per node, `ef_search` candidates; approximate.

An approximate index is only useful with its recall known, so `build_index` measures recall@K of
every approximate index against exact search over the same items, with the given queries (for a run:
its own user embeddings, i.e. the real query distribution).

A saved index is a folder: `index.faiss` (faiss.write_index), `item_ids.parquet` (id = raw item id,
row = embedding row, in index position order) and `manifest.json` (kind, parameters, size, recall).
`build_run_index` builds one from an MLflow run's item embeddings and logs it as the run's `index/`.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from recsys.errors import UserError

KINDS = ("flat", "ivf", "hnsw")
INDEX_FILE, IDS_FILE, MANIFEST_FILE = "index.faiss", "item_ids.parquet", "manifest.json"
#: Queries used to measure recall of an approximate index (a sample when there are more).
RECALL_QUERIES = 10_000


def import_faiss() -> Any:
    """faiss, or a one-line error saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise UserError(
            "retrieval needs faiss: `pip install 'recsys[retrieval]'` (faiss-cpu 1.15.1)"
        ) from None
    return faiss


@dataclass
class IndexParams:
    """How to build an index; fields not used by `kind` are ignored."""

    kind: str = "flat"
    nlist: int | None = (
        None  # ivf: lists; None = min(4·√items, items / 39) (faiss wants ≥ 39 points per list)
    )
    nprobe: int = 32  # ivf: lists searched per query
    m: int = 32  # hnsw: links per node
    ef_construction: int = 200  # hnsw: candidates while building
    ef_search: int = 128  # hnsw: candidates while searching

    def check(self) -> None:
        """Raise UserError on a kind or parameter that cannot build."""
        if self.kind not in KINDS:
            raise UserError(f"index kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        for name in ("nprobe", "m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise UserError(f"index {name} must be >= 1, got {getattr(self, name)}")
        if self.nlist is not None and self.nlist < 1:
            raise UserError(f"index nlist must be >= 1, got {self.nlist}")


def default_nlist(n: int) -> int:
    """IVF lists for n items: about 4·√n, but at least 39 training points per list (faiss' minimum)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


@dataclass
class ItemIndex:
    """A FAISS index over items, the raw id and embedding row of each index position, and its facts."""

    index: Any  # faiss.Index
    item_ids: np.ndarray  # object [n]: raw id of index position i
    item_rows: np.ndarray  # int64 [n]: embedding (vocabulary) row of index position i
    params: IndexParams
    facts: dict[str, Any] = field(default_factory=dict)  # recall@k, build seconds, …

    @property
    def exact(self) -> bool:
        """Whether searches are exact (a flat index)."""
        return self.params.kind == "flat"

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores [n, k], index positions [n, k]) best first; position -1 where fewer than k were found."""
        q = np.ascontiguousarray(queries, dtype=np.float32)
        return self.index.search(q, min(k, self.index.ntotal))

    def save(self, folder: str | Path) -> Path:
        """Write index.faiss, item_ids.parquet and manifest.json into `folder`; returns it."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        faiss = import_faiss()
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        faiss.write_index(self.index, str(out / INDEX_FILE))
        ids = pa.table({"id": pa.array(list(self.item_ids), pa.string()), "row": self.item_rows})
        pq.write_table(ids, out / IDS_FILE)
        manifest = {
            "params": asdict(self.params),
            "items": int(self.index.ntotal),
            "dim": int(self.index.d),
            "metric": "inner_product",
            "faiss_version": faiss.__version__,
            **self.facts,
        }
        (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
        return out

    @classmethod
    def load(cls, folder: str | Path) -> ItemIndex:
        """Read a folder written by `save`; the search parameters (nprobe, ef_search) are restored."""
        import pyarrow.parquet as pq

        faiss = import_faiss()
        folder = Path(folder)
        for name in (INDEX_FILE, IDS_FILE, MANIFEST_FILE):
            if not (folder / name).is_file():
                raise UserError(f"{folder}: no {name}; not an index folder written by `recsys index build`")
        manifest = json.loads((folder / MANIFEST_FILE).read_text())
        params = IndexParams(**manifest.pop("params"))
        index = faiss.read_index(str(folder / INDEX_FILE))
        _set_search_params(index, params)
        ids = pq.read_table(folder / IDS_FILE)
        if len(ids) != index.ntotal:
            raise UserError(f"{folder}: {IDS_FILE} has {len(ids)} ids for {index.ntotal} indexed items")
        facts = {k: v for k, v in manifest.items() if k not in ("items", "dim", "metric", "faiss_version")}
        return cls(
            index,
            np.asarray(ids.column("id").to_pylist(), dtype=object),
            ids.column("row").to_numpy().astype(np.int64),
            params,
            facts,
        )


def _set_search_params(index: Any, params: IndexParams) -> None:
    """nprobe / efSearch are search-time settings that write_index does not keep for every kind."""
    faiss = import_faiss()
    if params.kind == "ivf":
        faiss.extract_index_ivf(index).nprobe = params.nprobe
    elif params.kind == "hnsw":
        index.hnsw.efSearch = params.ef_search


def make_faiss_index(vectors: np.ndarray, params: IndexParams, seed: int = 0) -> Any:
    """Train (IVF) and fill a FAISS inner-product index of `kind` with `vectors` [n, d] (float32)."""
    faiss = import_faiss()
    n, d = vectors.shape
    if params.kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif params.kind == "ivf":
        nlist = min(params.nlist or default_nlist(n), n)
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed  # reproducible k-means
        # k-means on a sample of 64 points per list (faiss' default, 256, makes training on 1M
        # items ~4x slower for no measurable recall on trained-like data).
        index.cp.max_points_per_centroid = 64
        index.train(vectors)
    else:
        index = faiss.IndexHNSWFlat(d, params.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = params.ef_construction
    index.add(vectors)
    _set_search_params(index, params)
    return index


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ truth| / |truth| (rows of item positions; -1 = empty slot)."""
    hits = [
        len(set(f[f >= 0].tolist()) & set(t[t >= 0].tolist())) / max(int((t >= 0).sum()), 1)
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else math.nan


def measure_recall(index: Any, vectors: np.ndarray, queries: np.ndarray, k: int) -> float:
    """Recall@k of `index` against exact inner-product search over the same `vectors`."""
    faiss = import_faiss()
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors)
    k = min(k, exact.ntotal)
    _, truth = exact.search(queries, k)
    _, found = index.search(queries, k)
    return recall_at_k(found, truth)


def _sample(queries: np.ndarray, n: int, seed: int) -> np.ndarray:
    if len(queries) <= n:
        return queries
    return queries[np.sort(np.random.default_rng(seed).choice(len(queries), n, replace=False))]


def build_index(
    vectors: np.ndarray,
    item_ids: Sequence[str],
    params: IndexParams | None = None,
    item_rows: Sequence[int] | None = None,
    queries: np.ndarray | None = None,
    recall_k: int = 100,
    seed: int = 0,
) -> ItemIndex:
    """Index `vectors` [n, d] of items `item_ids`; an approximate index gets recall@recall_k measured
    against exact search with `queries` (up to RECALL_QUERIES of them; none: the items themselves)."""
    params = params or IndexParams()
    params.check()
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or len(vectors) == 0:
        raise UserError(f"need a non-empty [items, dim] embedding matrix, got shape {vectors.shape}")
    if len(item_ids) != len(vectors):
        raise UserError(f"{len(item_ids)} item ids for {len(vectors)} embeddings")
    t = time.perf_counter()
    index = make_faiss_index(vectors, params, seed)
    facts: dict[str, Any] = {"build_seconds": round(time.perf_counter() - t, 3)}
    if params.kind == "flat":
        facts[f"recall_at_{recall_k}"] = 1.0  # exact by construction
    else:
        q = _sample(vectors if queries is None else queries, RECALL_QUERIES, seed)
        q = np.ascontiguousarray(q, dtype=np.float32)
        facts[f"recall_at_{recall_k}"] = measure_recall(index, vectors, q, recall_k)
        facts["recall_queries"] = len(q)
    rows = np.arange(len(vectors)) if item_rows is None else np.asarray(item_rows)
    return ItemIndex(index, np.asarray(list(item_ids), dtype=object), rows.astype(np.int64), params, facts)


def build_run_index(
    run_id: str,
    uri: str | None = None,
    params: IndexParams | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    recall_k: int = 100,
    log: bool = True,
) -> ItemIndex:
    """Index a Two-Tower run's item embeddings (recall measured with its user embeddings) and log
    the folder as the run's `index/` artifacts plus `index/…` metrics."""
    from recsys.retrieval.runs import INDEX_DIR, open_run

    run = open_run(run_id, uri, config, overrides)
    items, users = run.embeddings("item"), run.embeddings("user")
    idx = build_index(
        items.vectors, items.ids, params, items.rows, users.vectors, recall_k, seed=run.cfg.train.seed
    )
    idx.facts["run_id"] = run.run_id  # resolved when given as models:/NAME@ALIAS
    if log:
        client = run.client()
        with tempfile.TemporaryDirectory() as tmp:
            client.log_artifacts(run.run_id, str(idx.save(tmp)), INDEX_DIR)
        for key in (f"recall_at_{recall_k}", "build_seconds"):
            client.log_metric(run.run_id, f"index/{idx.params.kind}/{key}", float(idx.facts[key]))
    return idx


def load_run_index(run_id: str, uri: str) -> ItemIndex | None:
    """The index logged with a run (its `index/` artifacts), or None when it has none."""
    from recsys.retrieval.runs import INDEX_DIR, download, has_artifact

    if not has_artifact(run_id, uri, INDEX_DIR):
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return ItemIndex.load(download(run_id, uri, INDEX_DIR, tmp))

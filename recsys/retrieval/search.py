"""Top-k unseen items for query vectors: the search every list of the project goes through (batch
`recsys recommend`, the served pyfunc, recommendations from a request's history).

Removing seen items never shortens a list: rows are searched for k + a first depth of seen items;
rows still short (an approximate index can return fewer) are searched again with twice the depth,
and at the catalogue's size with exact search.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from recsys.retrieval.index import ItemIndex


def _keep_unseen(
    scores: np.ndarray, found: np.ndarray, seen: tuple[np.ndarray, np.ndarray], queries: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first k unseen results per row: (scores [n, k], positions [n, k] with -1 padding, counts [n])."""
    indptr, items = seen
    lengths = indptr[queries + 1] - indptr[queries]
    local = np.repeat(np.arange(len(queries)), lengths)
    starts = np.repeat(indptr[queries], lengths)
    offsets = np.arange(int(lengths.sum())) - np.repeat(lengths.cumsum() - lengths, lengths)
    # One int64 key per (row, item) pair: row in the high 32 bits, index position in the low ones.
    seen_keys = local * np.int64(1 << 32) + items[starts + offsets]
    keys = np.arange(len(queries))[:, None] * np.int64(1 << 32) + found
    valid = (found >= 0) & ~np.isin(keys, seen_keys)
    # A stable sort on "not valid" moves each row's valid results to its front, best first.
    order = np.argsort(~valid, axis=1, kind="stable")[:, :k]
    top_s = np.take_along_axis(scores, order, 1)
    top_i = np.take_along_axis(found, order, 1)
    count = np.minimum(valid.sum(1), k)
    filled = np.arange(order.shape[1])[None, :] < count[:, None]
    top_i = np.where(filled, top_i, -1)
    pad = k - top_i.shape[1]
    if pad > 0:
        top_s = np.pad(top_s, ((0, 0), (0, pad)))
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s, top_i, count


def first_depth(n_seen: np.ndarray, k: int) -> int:
    """k + the 99th-percentile seen count, not the max: one heavy user would otherwise widen every
    row of a batch; the few rows left short are searched again, deeper."""
    return k + int(np.quantile(n_seen, 0.99)) if len(n_seen) else k


def search_unseen(
    index: ItemIndex,
    vectors: np.ndarray,
    queries: np.ndarray,
    seen: tuple[np.ndarray, np.ndarray],
    k: int,
    exact: Callable[[], ItemIndex],
    depth: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k unseen items of `queries` (positions into `seen`'s rows): (scores, positions, -1 = none).

    `depth` is the first search's depth (default: from this batch's seen counts); a fixed one makes
    each row's result independent of the batch it is in (see `first_depth`).
    """
    indptr = seen[0]
    n_items = index.index.ntotal
    n_seen = indptr[queries + 1] - indptr[queries]
    want = np.minimum(k, n_items - n_seen)
    depth = min(depth if depth is not None else first_depth(n_seen, k), n_items)
    out_s = np.zeros((len(queries), k), np.float32)
    out_i = np.full((len(queries), k), -1, np.int64)
    todo, searcher = np.arange(len(queries)), index
    while len(todo):
        s, f = searcher.search(vectors[queries[todo]], depth)
        s, f, count = _keep_unseen(s, f, seen, queries[todo], k)
        out_s[todo], out_i[todo] = s, f
        todo = todo[count < want[todo]]
        if depth >= n_items:
            if searcher.exact or not len(todo):
                break
            searcher = exact()  # the approximate index cannot reach them: search those rows exactly
        depth = min(2 * depth, n_items)
    return out_s, out_i


def _exact_of(index: ItemIndex) -> Callable[[], ItemIndex]:
    """A builder of the exact flat index over the same items (vectors read back from `index`), built
    once on first use: most runs never need it."""

    @functools.cache
    def build() -> ItemIndex:
        from recsys.retrieval.index import IndexParams, build_index, import_faiss

        faiss = import_faiss()
        if index.params.kind == "ivf":
            faiss.extract_index_ivf(index.index).make_direct_map()  # IVF reconstructs only with one
        vectors = index.index.reconstruct_n(0, index.index.ntotal)
        return build_index(vectors, index.item_ids, IndexParams("flat"), index.item_rows)

    return build

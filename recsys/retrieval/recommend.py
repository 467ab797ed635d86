"""Top-K items for every (or each listed) user of a Two-Tower run, seen items removed.

- Queries are the run's user embeddings; the index is the run's logged `index/` (see
  `recsys.retrieval.index`), or an exact flat index built on the fly when the run has none.
- Seen items: each user's items in the excluded splits of the run's prepared folder (train by
  default), read with `read_split_arrays` in embedding rows and mapped to index positions.
- Removing seen items never shortens a list: each user batch is searched for k + the batch's most
  seen items; rows still short (an approximate index can return fewer) are searched again with twice
  as many, and at the catalogue's size with exact search. A list is shorter than k only when the user
  has fewer than k unseen items in the whole catalogue.
- Users the vocabulary does not know get the most popular items (train positives), `fallback=True`;
  their `score` is the item's train count, otherwise it is the user·item inner product.

Output Parquet columns: user (raw id), rank (1 = best), item (raw id), score (float32), fallback (bool).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError
from recsys.retrieval.search import _exact_of, first_depth, search_unseen

if TYPE_CHECKING:
    import pyarrow as pa

    from recsys.retrieval.index import ItemIndex
    from recsys.retrieval.runs import Embeddings, TwoTowerRun

#: Users searched per faiss call (bounds the [batch, k + seen] result arrays).
BATCH_USERS = 4096


@dataclass
class Recommendations:
    """What `recommend` produced: the table and counts for the one-line summary."""

    table: pa.Table
    users: int
    fallback: int
    index: str
    seconds: float
    unknown_items: int | None = None  # history item ids dropped as unknown (None: no histories given)


# --------------------------------------------------------------------------------------- inputs
def parse_exclude(spec: str) -> tuple[str, ...]:
    """'train', 'train,val', 'train,val,test' (any subset of the splits) or 'none' → split names."""
    from recsys.data.metadata import SPLITS

    if spec.strip() == "none":
        return ()
    splits = tuple(s.strip() for s in spec.split(",") if s.strip())
    bad = [s for s in splits if s not in SPLITS]
    if bad or not splits:
        raise UserError(
            f"--exclude {spec!r}: expected splits from {', '.join(SPLITS)} (comma-separated) or none"
        )
    return splits


def _column(table: Any, path: Path) -> list[str]:
    """Column `user` as raw ids; a null or empty user → one line naming the file and row."""
    from recsys.retrieval.raw_ids import id_column

    if "user" not in table.column_names:
        raise UserError(f"--users {path}: no column 'user' (columns: {', '.join(table.column_names)})")
    return id_column(table, "user", f"--users {path}")


def _text_users(path: Path) -> list[str]:
    """Ids of a text file, one per line, exactly as written (a blank line is refused, naming it)."""
    from recsys.text_lines import read_lines

    users = read_lines(path, "--users")
    for n, user in enumerate(users, 1):
        if not user.strip():
            raise UserError(f"--users {path}:{n}: blank line; write one user id per line, no blank lines")
    return users


def read_users(path: str | Path) -> list[str]:
    """Raw user ids from a Parquet/CSV file (column `user`) or a text file (one id per line), deduplicated."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        if path.suffix == ".parquet":
            users = _column(pq.read_table(path), path)
        elif path.suffix == ".csv":
            # Ids are exact strings ("007" is not 7): read the column as text.
            opts = pcsv.ConvertOptions(column_types={"user": pa.string()})
            users = _column(pcsv.read_csv(path, convert_options=opts), path)
        else:
            users = _text_users(path)
    except (OSError, UnicodeDecodeError, pa.ArrowException) as e:
        raise UserError(f"--users {path}: cannot read it ({type(e).__name__}: {e})") from None
    if not users:
        raise UserError(
            f"--users {path}: no user ids in it (one id per line, or a Parquet/CSV column 'user')"
        )
    return list(dict.fromkeys(users))


def _prepared(run: TwoTowerRun) -> tuple[Any, str]:
    """The run's prepared folder and its metadata, or a line saying how to point at it."""
    from recsys.data.metadata import metadata_path, read_metadata

    prepared = run.cfg.data.prepared_dir
    if not metadata_path(prepared).is_file():
        raise UserError(
            f"run {run.run_id}: its prepared data {prepared} (data.prepared_dir) is not here; "
            "pass --set data.prepared_dir=PATH"
        )
    return read_metadata(prepared), prepared


def _check_vocab(prepared: str, meta: Any, feature: str, ids: np.ndarray, rows: np.ndarray) -> None:
    """The logged embeddings must map to this prepared folder's vocabulary, or exclusion is wrong."""
    from recsys.data.metadata import read_vocab

    vocab = read_vocab(prepared, meta.sparse_features[meta.sparse_index(feature)])
    # The run logs every vocabulary row but OOV (row 0), so sizes match and row r holds vocab[r].
    if len(vocab) != len(rows) + 1 or any(vocab[r] != i for r, i in zip(rows, ids, strict=True)):
        raise UserError(
            f"{prepared}: its {feature} vocabulary differs from the run's embeddings; "
            "pass --set data.prepared_dir= the folder the run was trained on"
        )


# ------------------------------------------------------------------------------------- seen items
def seen_csr(
    prepared: str, meta: Any, splits: tuple[str, ...], query_of_row: np.ndarray, pos_of_row: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(indptr [Q+1], index positions) of the items each query user has in `splits`.

    `query_of_row` / `pos_of_row` map user / item embedding rows to query and index positions (-1: none).
    """
    from recsys.data.loader import read_split_arrays

    uc = meta.sparse_index(meta.user_feature or "")
    ic = meta.sparse_index(meta.item_feature or "")
    nq, ni = int(query_of_row.max(initial=-1)) + 1, len(pos_of_row)
    keys = [np.zeros(0, np.int64)]
    for split in splits:
        sparse = read_split_arrays(prepared, split, meta)["sparse"]
        q, i = query_of_row[sparse[:, uc]], pos_of_row[sparse[:, ic]]
        ok = (q >= 0) & (i >= 0)
        keys.append(q[ok] * ni + i[ok])
    key = np.unique(np.concatenate(keys))
    indptr = np.zeros(nq + 1, np.int64)
    indptr[1:] = np.bincount(key // max(ni, 1), minlength=nq).cumsum()
    return indptr, key % max(ni, 1)


def popularity(prepared: str, meta: Any, pos_of_row: np.ndarray) -> np.ndarray:
    """Train positives per index position (the cold-user fallback's order)."""
    from recsys.data.loader import read_split_arrays

    train = read_split_arrays(prepared, "train", meta)
    rows = train["sparse"][train["label"] > 0, meta.sparse_index(meta.item_feature or "")]
    counts = np.zeros(int(pos_of_row.max(initial=-1)) + 1, np.float32)
    pos = pos_of_row[rows]
    np.add.at(counts, pos[pos >= 0], 1.0)
    return counts


def _run_index(run: TwoTowerRun, items: Any) -> ItemIndex:
    """The run's logged index, or an exact one over its item embeddings."""
    from recsys.retrieval.index import build_index, load_run_index

    index = load_run_index(run.run_id, run.tracking_uri)
    if index is None:
        return build_index(items.vectors, items.ids, item_rows=items.rows)
    if not np.array_equal(np.sort(index.item_rows), np.sort(items.rows)):
        raise UserError(
            f"run {run.run_id}: its index/ does not cover the items of its embeddings; "
            f"rebuild it: recsys index build --run-id {run.run_id}"
        )
    return index


def _table(
    user_ids: list[str], scores: np.ndarray, positions: np.ndarray, fallback: np.ndarray, item_ids: np.ndarray
) -> pa.Table:
    """Long format: one row per (user, rank), empty slots (-1) dropped."""
    import pyarrow as pa

    filled = positions >= 0
    per_user = filled.sum(1)
    ranks = np.broadcast_to(np.arange(1, positions.shape[1] + 1, dtype=np.int32), positions.shape)
    return pa.table(
        {
            "user": pa.array(np.repeat(np.asarray(user_ids, dtype=object), per_user), pa.string()),
            "rank": pa.array(ranks[filled]),
            "item": pa.array(item_ids[positions[filled]], pa.string()),
            "score": pa.array(scores[filled].astype(np.float32)),
            "fallback": pa.array(np.repeat(fallback, per_user)),
        }
    )


@dataclass
class Retriever:
    """A run opened once for recommending: embeddings, index, seen items of every known user.

    Built by `open_retriever` in each process that recommends (a torchrun rank, a Spark task, a Ray
    actor); `recommend(users, k)` gives the same rows for a user whatever other users it is called with.
    """

    run: TwoTowerRun
    meta: Any
    prepared: str
    users: Embeddings
    index: ItemIndex
    exclude: tuple[str, ...]
    seen: tuple[np.ndarray, np.ndarray]  # CSR over `users` positions → index positions
    pos_of_row: np.ndarray  # item embedding row → index position (-1: none)

    @functools.cached_property
    def emb_of_id(self) -> dict[str, int]:
        """Raw user id → position in `users`."""
        return {u: j for j, u in enumerate(self.users.ids)}

    @functools.cached_property
    def exact(self) -> Callable[[], ItemIndex]:
        """The exact index for rows an approximate one cannot fill (built on first use)."""
        return _exact_of(self.index)

    @functools.cached_property
    def extra_depth(self) -> int:
        """First search depth beyond k, from every known user's seen count (once per process, not per
        call: Spark and Ray call `recommend` once per batch)."""
        return first_depth(np.diff(self.seen[0]), 0)

    @functools.cached_property
    def popular(self) -> tuple[np.ndarray, np.ndarray]:
        """(index positions, train counts) in popularity order; ties: the lower position."""
        counts = popularity(self.prepared, self.meta, self.pos_of_row)
        order = np.argsort(-counts, kind="stable")
        return order, counts[order]

    def all_users(self) -> list[str]:
        """Every user with an embedding, in the run's embedding order."""
        return list(self.users.ids)

    def recommend(self, user_ids: list[str], k: int) -> pa.Table:
        """Top-k unseen items of `user_ids` (raw ids; unknown ones get popularity) as the long table."""
        emb_pos = np.array([self.emb_of_id.get(u, -1) for u in user_ids], np.int64)
        known = np.flatnonzero(emb_pos >= 0)
        scores = np.zeros((len(user_ids), k), np.float32)
        positions = np.full((len(user_ids), k), -1, np.int64)
        # Depth from every user's seen count, not the batch's: a user's list must not depend on
        # which other users share its call (partitions of a distributed run differ in size).
        depth = k + self.extra_depth
        for start in range(0, len(known), BATCH_USERS):
            rows = known[start : start + BATCH_USERS]
            found = search_unseen(
                self.index, self.users.vectors, emb_pos[rows], self.seen, k, self.exact, depth
            )
            scores[rows], positions[rows] = found
        cold = np.flatnonzero(emb_pos < 0)
        if len(cold):
            top, counts = self.popular[0][:k], self.popular[1][:k]
            positions[cold, : len(top)], scores[cold, : len(top)] = top, counts
        return _table(user_ids, scores, positions, emb_pos < 0, self.index.item_ids)

    @functools.cached_property
    def encoder(self) -> Any:
        """The run's history encoder (recsys.retrieval.history_users), loaded on first use."""
        from recsys.retrieval.history_users import open_encoder

        return open_encoder(self.run.cfg, self.run.run_id, self.prepared)

    def recommend_histories(
        self, user_ids: list[str], histories: list[list[str]], k: int
    ) -> tuple[pa.Table, np.ndarray]:
        """Top-k items of users given their recent items (raw ids, most recent last): the long table
        with `unknown_items` (history ids the run does not know, dropped), and those counts per user."""
        import pyarrow as pa

        from recsys.retrieval.history_users import recommend_histories

        scores, positions, unknown = recommend_histories(
            self.encoder, self.index, self.seen, self.emb_of_id, user_ids, histories, k, self.exact,
            k + self.extra_depth,
        )  # fmt: skip
        table = _table(user_ids, scores, positions, np.zeros(len(user_ids), bool), self.index.item_ids)
        per_user = (positions >= 0).sum(1)
        column = pa.array(np.repeat(unknown, per_user), pa.int64())
        return table.append_column("unknown_items", column), unknown


def open_retriever(
    run_id: str,
    uri: str | None = None,
    exclude: tuple[str, ...] = ("train",),
    config: str | None = None,
    overrides: list[str] | None = None,
) -> Retriever:
    """Open Two-Tower run `run_id` for recommending: checked, embeddings, index and seen items loaded."""
    from recsys.retrieval.runs import open_run

    run = open_run(run_id, uri, config, overrides)
    meta, prepared = _prepared(run)
    u_emb, i_emb = run.embeddings("user"), run.embeddings("item")
    _check_vocab(prepared, meta, meta.user_feature or "", u_emb.ids, u_emb.rows)
    _check_vocab(prepared, meta, meta.item_feature or "", i_emb.ids, i_emb.rows)
    index = _run_index(run, i_emb)
    # Seen items of every user with an embedding, by its position in the embeddings.
    query_of_row = np.full(int(u_emb.rows.max(initial=0)) + 1, -1, np.int64)
    query_of_row[u_emb.rows] = np.arange(len(u_emb.rows))
    pos_of_row = np.full(int(index.item_rows.max(initial=0)) + 1, -1, np.int64)
    pos_of_row[index.item_rows] = np.arange(len(index.item_rows))
    seen = seen_csr(prepared, meta, exclude, query_of_row, pos_of_row)
    return Retriever(run, meta, prepared, u_emb, index, exclude, seen, pos_of_row)


def check_k(k: int) -> None:
    """--k must be at least 1."""
    if k < 1:
        raise UserError(f"--k must be >= 1, got {k}")


def write_parquet(table: pa.Table, out: str | Path) -> None:
    """Write `table` to `out` (parent folders created)."""
    import pyarrow.parquet as pq

    Path(out).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)


def recommend(
    run_id: str,
    uri: str | None = None,
    users: str | Path = "all",
    k: int = 100,
    exclude: tuple[str, ...] = ("train",),
    out: str | Path | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    history_file: str | Path | None = None,
) -> Recommendations:
    """Top-k unseen items for `users` ('all' = every user with an embedding, or a file of raw ids) of
    Two-Tower run `run_id`; written to Parquet `out` when given. With `history_file` (see
    recsys.retrieval.history_users.read_history_file), its users' vectors come from its items."""
    check_k(k)
    if history_file is not None and str(users) != "all":
        raise UserError("--history-file names its users: leave out --users")
    t0 = time.perf_counter()
    wanted = None if str(users) == "all" else read_users(users)
    ret = open_retriever(run_id, uri, exclude, config, overrides)
    if history_file is not None:
        return _recommend_histories(ret, history_file, k, out, t0)
    user_ids = ret.all_users() if wanted is None else wanted
    table = ret.recommend(user_ids, k)
    if out is not None:
        write_parquet(table, out)
    cold = sum(u not in ret.emb_of_id for u in user_ids)
    return Recommendations(table, len(user_ids), cold, ret.index.params.kind, time.perf_counter() - t0)


def _recommend_histories(
    ret: Retriever, path: str | Path, k: int, out: str | Path | None, t0: float
) -> Recommendations:
    """`recommend` for the users and histories of `path` (a run whose model reads histories)."""
    from recsys.retrieval.history_users import read_history_file, require_history_model

    require_history_model(ret.run.cfg, f"--history-file {path}")
    user_ids, histories = read_history_file(path)
    table, unknown = ret.recommend_histories(user_ids, histories, k)
    if out is not None:
        write_parquet(table, out)
    cold = sum(u not in ret.emb_of_id for u in user_ids)
    seconds = time.perf_counter() - t0
    return Recommendations(table, len(user_ids), cold, ret.index.params.kind, seconds, int(unknown.sum()))

"""Retrieve → rank: the Two-Tower's top-N candidates per user re-ordered by a ranking run (DLRM/DCN).

- The ranker is an MLflow run of `model.kind: dlrm` trained on the same interactions with user and
  item side features and sampled negatives (`data.negatives`, e.g. the shipped movielens_100k_ranker),
  or on the retriever's own candidates (`recsys data candidates`, movielens_100k_candidate_ranker).
  Every one of its sparse features must describe the user or the item (id or side feature), and its
  dense features may only be the constant one prepare adds, or the candidate features
  (recsys.retrieval.candidates.DENSE: retrieval score, gap, rank and history counts, and optionally
  the EASE item-to-item ones, computed here from the retrieved list, the tables its folder keeps and
  each user's seen items); such a ranker serves only the retrieval
  run whose candidates it was trained on.
- A pair's feature row: the user's features and the item's features as they appear in the ranker's
  prepared data (last row seen), mapped by raw id. The retrieval data's users and items must all be in
  the ranker's vocabularies, or the error says to train the ranker on the same interactions.
- Users unknown to the retrieval run keep their popularity fallback list (`fallback=True`, score =
  train count); every other list is ordered by the ranker's click probability (`score`), ties by
  the retrieval rank, kept in `retrieval_rank`.

Output columns: those of `recommend` (user, rank, item, score, fallback) plus retrieval_rank.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa
    from torch import nn

    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.retrieval.recommend import Recommendations

#: Pairs scored per ranker forward (bounds the feature batch).
SCORE_BATCH = 65536
STATE_ARTIFACT = "state_dict/model.pt"
#: `model` tags of ranking runs (recsys.tracking.run_tags: DLRM with the dot or the DCN interaction).
RANKER_TAGS = ("dlrm", "dlrm_dcn")


@dataclass
class Ranker:
    """A ranking run ready to score (user, item) pairs by raw id."""

    run_id: str
    cfg: Config
    meta: Metadata
    task: nn.Module  # plain DLRMTask on CPU, eval mode
    user_row: dict[str, int]  # raw user id → ranker vocabulary row
    item_row: dict[str, int]  # raw item id → ranker vocabulary row
    user_table: np.ndarray  # int64 [U, S]: a user row's values of the user columns (others 0)
    item_table: np.ndarray  # int64 [I, S]: an item row's values of the item columns (others 0)
    history: Any = None  # candidates.History of a ranker trained on retriever candidates, else None

    @property
    def retriever_run_id(self) -> str | None:
        """The retrieval run whose candidates this ranker was trained on (None: sampled negatives)."""
        from recsys.retrieval.candidates import LABEL_MODE

        label = self.meta.label
        return str(label["retriever_run_id"]) if label.get("mode") == LABEL_MODE else None


# ------------------------------------------------------------------------------------------ ranker
def _ranker_config(run_id: str, uri: str, overrides: list[str] | None) -> Config:
    """The run's resolved config, after checking it is a ranking (dlrm) run."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from recsys.config import load_config
    from recsys.retrieval.runs import CONFIG_ARTIFACT, download, has_artifact
    from recsys.tracking import is_gone, short_error

    try:
        run = mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        if not is_gone(e) and e.get_http_status_code() >= 500:
            raise UserError(
                f"tracking URI {uri}: the MLflow server did not answer for --ranker-run-id {run_id} "
                f"({short_error(e)}); try again when it is back"
            ) from None
        raise UserError(
            f"--ranker-run-id {run_id!r}: not found in {uri} ({e.error_code}); pass a run trained with "
            "model.kind: dlrm (e.g. --config movielens_100k_ranker)"
        ) from None
    model = run.data.tags.get("model")
    if model not in RANKER_TAGS:
        raise UserError(
            f"--ranker-run-id {run_id}: a {model or 'untagged'} run, not a ranking model; pass a run "
            "trained with model.kind: dlrm (DLRM or DCN) on the same interactions"
        )
    for path in (CONFIG_ARTIFACT, STATE_ARTIFACT):
        if not has_artifact(run_id, uri, path):
            raise UserError(f"--ranker-run-id {run_id}: no {path} (trained with tracking.log_model=false?)")
    with tempfile.TemporaryDirectory() as tmp:
        return load_config(download(run_id, uri, CONFIG_ARTIFACT, tmp), overrides)


def _check_features(run_id: str, meta: Metadata) -> tuple[list[int], list[int]]:
    """Column indices of the user's and of the item's features; every feature must be one of them."""
    from recsys.data.negatives import CONST_DENSE
    from recsys.retrieval.candidates import DENSE, LABEL_MODE
    from recsys.retrieval.item_item import ITEM_ITEM_DENSE

    if meta.user_feature is None or meta.item_feature is None:
        raise UserError(f"--ranker-run-id {run_id}: trained on data without user/item columns")
    names = [f.name for f in meta.sparse_features]
    user = [names.index(n) for n in [meta.user_feature, *meta.user_side_features]]
    item = [names.index(n) for n in [meta.item_feature, *meta.item_side_features]]
    other = [n for j, n in enumerate(names) if j not in user + item]
    candidates = meta.label.get("mode") == LABEL_MODE and tuple(meta.dense_features) in (
        DENSE,
        DENSE + ITEM_ITEM_DENSE,
    )
    dense = [] if candidates else [n for n in meta.dense_features if n != CONST_DENSE]
    if other or dense:
        raise UserError(
            f"--ranker-run-id {run_id}: features {other + dense} describe neither the user nor the item; "
            "a candidate pair has only user and item features (train the ranker on those)"
        )
    return user, item


def _load_task(run_id: str, uri: str, cfg: Config, meta: Metadata) -> nn.Module:
    import torch

    from recsys.models.task import build_task
    from recsys.retrieval.runs import download

    with tempfile.TemporaryDirectory() as tmp:
        state = torch.load(download(run_id, uri, STATE_ARTIFACT, tmp), map_location="cpu", weights_only=True)
    task = build_task(cfg, meta, ebc_device="cpu", training=False)
    missing, unexpected = task.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"--ranker-run-id {run_id}: its model does not match its config "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return task.eval()


def open_ranker(run_id: str, uri: str | None = None, overrides: list[str] | None = None) -> Ranker:
    """Check and load ranking run `run_id`: config, prepared data's vocabularies and feature tables, model.

    `overrides` (`a.b=v`) apply to the ranker's config, e.g. data.prepared_dir=… when it has moved.
    """
    from recsys.data.metadata import metadata_path, read_metadata, read_vocab
    from recsys.evaluate import _entity_table, read_all_splits
    from recsys.retrieval.candidates import LABEL_MODE, load_tables
    from recsys.retrieval.runs import tracking_uri

    uri = tracking_uri(uri)
    cfg = _ranker_config(run_id, uri, overrides)
    prepared = cfg.data.prepared_dir
    if not metadata_path(prepared).is_file():
        raise UserError(
            f"--ranker-run-id {run_id}: its prepared data {prepared} is not here; "
            "pass --ranker-set data.prepared_dir=PATH"
        )
    meta = read_metadata(prepared)
    user_cols, item_cols = _check_features(run_id, meta)
    if meta.label.get("mode") == LABEL_MODE:  # its folder keeps the served retriever's tables
        user_table, item_table, history = load_tables(prepared)
        rows = [
            {raw: r for r, raw in enumerate(read_vocab(prepared, meta.sparse_features[key])) if r > 0}
            for key in (user_cols[0], item_cols[0])
        ]
        task = _load_task(run_id, uri, cfg, meta)
        return Ranker(run_id, cfg, meta, task, rows[0], rows[1], user_table, item_table, history)
    arrays = list(read_all_splits(cfg, meta).values())
    tables = []
    for key, cols in ((user_cols[0], user_cols), (item_cols[0], item_cols)):
        n = meta.sparse_features[key].num_embeddings
        full = np.zeros((n, len(meta.sparse_features)), np.int64)
        full[:, cols] = _entity_table(arrays, key, cols, n)
        tables.append(full)
    rows = [
        {raw: r for r, raw in enumerate(read_vocab(prepared, meta.sparse_features[key])) if r > 0}
        for key in (user_cols[0], item_cols[0])
    ]
    task = _load_task(run_id, uri, cfg, meta)
    return Ranker(run_id, cfg, meta, task, rows[0], rows[1], tables[0], tables[1])


def check_vocab(ranker: Ranker, run_id: str, prepared: str, meta: Metadata) -> None:
    """The retrieval data's users and items must all be known to the ranker, or its scores are noise."""
    from recsys.data.metadata import read_vocab

    trained_on = ranker.retriever_run_id
    if trained_on is not None and trained_on != run_id:
        raise UserError(
            f"--ranker-run-id {ranker.run_id}: trained on the candidates of retrieval run {trained_on}, not "
            f"{run_id} (its scores and ranks are features); rebuild: recsys data candidates --run-id {run_id}"
        )
    for side, key, known in (
        ("user", meta.user_feature, ranker.user_row),
        ("item", meta.item_feature, ranker.item_row),
    ):
        ids = read_vocab(prepared, meta.sparse_features[meta.sparse_index(key or "")])[1:]
        missing = [i for i in ids if i not in known]
        if missing:
            raise UserError(
                f"--ranker-run-id {ranker.run_id}: its {side} vocabulary ({ranker.cfg.data.prepared_dir}) lacks "
                f"{len(missing)} of the {len(ids)} {side}s of run {run_id}'s data ({prepared}), e.g. "
                f"{missing[0]!r}; train the ranker on the same interactions"
            )


# ------------------------------------------------------------------------------------------ scoring
def ranker_rows(ranker: Ranker, users: np.ndarray, items: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vocabulary rows of raw user and item ids in the ranker's data (0 = OOV)."""
    u = np.array([ranker.user_row.get(x, 0) for x in users], np.int64)
    i = np.array([ranker.item_row.get(x, 0) for x in items], np.int64)
    return u, i


def score_pairs(
    ranker: Ranker, users: np.ndarray, items: np.ndarray, dense: np.ndarray | None = None
) -> np.ndarray:
    """Click probabilities (float32 [n]) of (raw user id, raw item id) pairs; unknown ids use the OOV row.

    `dense` [n, D]: the pairs' dense features (default: the constant one of sampled-negative rankers)."""
    import torch

    from recsys.data.batch import to_batch

    u, i = ranker_rows(ranker, users, items)
    if dense is None:
        dense = np.ones((len(u), len(ranker.meta.dense_features)), np.float32)
    keys = [f.name for f in ranker.meta.sparse_features]
    out = np.zeros(len(u), np.float32)
    with torch.no_grad():
        for s in range(0, len(u), SCORE_BATCH):
            sl = slice(s, s + SCORE_BATCH)
            # User and item columns are disjoint, and each table is 0 outside its own: the sum is the row.
            sparse = ranker.user_table[u[sl]] + ranker.item_table[i[sl]]
            n = len(sparse)
            batch = to_batch(
                np.zeros(n, np.float32),
                np.ascontiguousarray(dense[sl], np.float32),
                np.ascontiguousarray(sparse.T),
                keys,
            )
            logits = ranker.task.model(batch.dense_features, batch.sparse_features).squeeze(-1)
            out[sl] = torch.sigmoid(logits).numpy()
    return out


def score_table(table: pa.Table, ranker: Ranker, history: Any = None) -> np.ndarray:
    """Ranker probabilities of a recommendation table's rows (NaN for fallback rows, kept as retrieved);
    `history` (a candidates.History, default the ranker's) says each user's known items."""
    fallback = table.column("fallback").to_numpy(zero_copy_only=False)
    scores = np.full(table.num_rows, np.nan, np.float32)
    warm = np.flatnonzero(~fallback)
    users = np.asarray(table.column("user").to_pylist(), dtype=object)
    items = np.asarray(table.column("item").to_pylist(), dtype=object)
    dense = pair_dense(table, ranker, ~fallback, history)
    scores[warm] = score_pairs(ranker, users[warm], items[warm], dense)
    return scores


def pair_dense(table: pa.Table, ranker: Ranker, rows: np.ndarray, history: Any = None) -> np.ndarray | None:
    """Dense features of a recommendation table's `rows` (bool mask) as a candidates ranker was trained
    on them (retrieval score and rank from the list, history counts from its folder; each user's known
    items from `history`, default the folder's train items); None otherwise."""
    if ranker.history is None:
        return None
    history = history or ranker.history
    import pyarrow.compute as pc

    from recsys.retrieval.candidates import dense_features

    code = pc.dictionary_encode(table.column("user").combine_chunks()).indices.to_numpy()[rows]
    rank = table.column("rank").to_numpy()[rows]
    score = table.column("score").to_numpy()[rows]
    users = np.asarray(table.column("user").to_pylist(), dtype=object)[rows]
    items = np.asarray(table.column("item").to_pylist(), dtype=object)[rows]
    u, i = ranker_rows(ranker, users, items)
    return dense_features(code, score, rank, u, i, history)


def known_history(ranker: Ranker, prepared: str, meta: Metadata, exclude: tuple[str, ...]) -> Any:
    """The ranker's History with each user's known items = their rows in the `exclude` splits of the
    retrieval data (the items the lists leave out, e.g. train and val for test); None for other rankers."""
    if ranker.history is None or tuple(exclude) == ("train",):
        return ranker.history  # its folder keeps the train items
    from recsys.data.loader import read_split_arrays
    from recsys.retrieval.candidates import with_known

    sparse = [read_split_arrays(prepared, s, meta)["sparse"] for s in exclude]
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    nu, ni = len(ranker.history.user), len(ranker.history.item)
    return with_known(ranker.history, np.concatenate(sparse), uc, ic, nu, ni)


def rerank(table: pa.Table, scores: np.ndarray, k: int, candidates: int | None = None) -> pa.Table:
    """Each user's first `candidates` retrieved items (all by default) ordered by `scores`, top k kept.

    Fallback rows keep their retrieval order and score. Users stay in the table's order.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    rank = table.column("rank").to_numpy()
    keep = np.flatnonzero(rank <= (candidates or int(rank.max(initial=0))))
    t = table.take(pa.array(keep))
    ranker_s, rank = scores[keep], rank[keep]
    fallback = t.column("fallback").to_numpy(zero_copy_only=False)
    user = pc.dictionary_encode(t.column("user").combine_chunks()).indices.to_numpy()
    primary = np.where(fallback, rank.astype(np.float64), -ranker_s.astype(np.float64))
    order = np.lexsort((rank, primary, user))  # user first (first-seen order), then score, then rank
    starts = np.r_[0, np.flatnonzero(np.diff(user[order])) + 1]
    sizes = np.diff(np.r_[starts, len(order)])
    new_rank = np.arange(len(order)) - np.repeat(starts, sizes) + 1
    top = new_rank <= k
    o = order[top]
    score = np.where(fallback, t.column("score").to_numpy(), ranker_s).astype(np.float32)
    return pa.table(
        {
            "user": t.column("user").take(pa.array(o)),
            "rank": pa.array(new_rank[top].astype(np.int32)),
            "item": t.column("item").take(pa.array(o)),
            "score": pa.array(score[o]),
            "fallback": pa.array(fallback[o]),
            "retrieval_rank": pa.array(rank[o].astype(np.int32)),
        }
    )


# ------------------------------------------------------------------------------------------ funnel
def retrieval_data(run_id: str, uri: str | None, config: str | None, overrides: list[str] | None) -> Any:
    """(TwoTowerRun, prepared folder, its Metadata) of a retrieval run, or a line saying what is missing."""
    from recsys.data.metadata import metadata_path, read_metadata
    from recsys.retrieval.runs import open_run

    run = open_run(run_id, uri, config, overrides)
    prepared = run.cfg.data.prepared_dir
    if not metadata_path(prepared).is_file():
        raise UserError(
            f"run {run_id}: its prepared data {prepared} (data.prepared_dir) is not here; "
            "pass --set data.prepared_dir=PATH"
        )
    return run, prepared, read_metadata(prepared)


def retrieve_and_rank(
    run_id: str,
    ranker_run_id: str,
    uri: str | None = None,
    users: str | Path = "all",
    candidates: int = 100,
    k: int = 10,
    exclude: tuple[str, ...] = ("train",),
    out: str | Path | None = None,
    config: str | None = None,
    overrides: list[str] | None = None,
    ranker_overrides: list[str] | None = None,
) -> Recommendations:
    """Top-`candidates` unseen items per user from Two-Tower run `run_id`, re-ranked by ranking run
    `ranker_run_id` to the top k; written to Parquet `out` when given."""
    from recsys.retrieval.recommend import recommend

    if k < 1 or candidates < k:
        raise UserError(f"--candidates ({candidates}) must be >= --k ({k}) >= 1")
    t0 = time.perf_counter()
    run, prepared, meta = retrieval_data(run_id, uri, config, overrides)
    ranker = open_ranker(ranker_run_id, run.tracking_uri, ranker_overrides)
    check_vocab(ranker, run_id, prepared, meta)
    rec = recommend(run_id, run.tracking_uri, users, candidates, exclude, None, config, overrides)
    history = known_history(ranker, prepared, meta, exclude)
    table = rerank(rec.table, score_table(rec.table, ranker, history), k)
    if out is not None:
        import pyarrow.parquet as pq

        Path(out).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, out)
    return replace(rec, table=table, seconds=time.perf_counter() - t0)

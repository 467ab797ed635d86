"""Ranker data from the retriever's own candidates: hard negatives, cross-fitted (`recsys data candidates`).

A ranker trained on uniform negatives learns to tell a watched film from a random one (mostly
popularity); at serving it has to order the retriever's top-N, which are all plausible. So its rows
here are the retriever's top-N, labelled by what the user really did next, scored by a retriever
that never saw that interaction:

- **Cross-fitting (train split).** Each train row of the retriever's data gets one of K folds, seeded
  per row position (`fold_of`). For every fold k a retriever with the run's own config is trained on
  the train rows of the other folds (a derived prepared folder, same vocabularies, same val for early
  stopping). Its top-N unseen items (its own train items removed) for each user with a fold-k row
  become ranker rows: label 1 when (user, item) is a fold-k row, else 0. A pair the fold retriever
  trained on is never scored (its train items are removed), and every positive is a held-out one.
- **Val and test.** The served retriever (the run, trained on all train) gives the top-N of each user
  with val (test) rows, train (and for test val) items removed, label 1 when the pair is in val (test):
  exactly what the ranker meets at serving, so early stopping and the choice of N happen on val.
- **Features.** Sparse: the retriever data's user and item columns (ids and side features) with its
  vocabularies (vocab/ is copied, rows are the same). Dense (`DENSE`): the retrieval score, its gap to
  the user's top score, log rank, the user's and the item's train-row counts relative to the mean
  (log1p), and the mean and max item-to-item cosine of the candidate with the user's train items —
  all from the scoring retriever's train rows; with `data.candidates.item_item_lambda`, also the EASE
  item-to-item score z-scored and ranked within the user's list (recsys.retrieval.item_item), its
  weights fit on those same rows. A val (test) row's user items are those its list excludes: train
  (train and val). The folder also keeps, under `ranker/`, the served
  retriever's feature and count tables, so scoring any (user, item) later needs no other folder.

Holds the retriever data's splits in memory (as `recsys evaluate` does); ML-100K-sized data.
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    import pyarrow as pa

    from recsys.config import Config
    from recsys.data.metadata import Metadata
    from recsys.retrieval.recommend import Retriever
    from recsys.retrieval.runs import TwoTowerRun

#: Dense features of a candidate row, in column order (what rank.py computes again at serving).
DENSE = (
    "retrieval_score",
    "retrieval_gap",
    "retrieval_log_rank",
    "user_activity",
    "item_popularity",
    "item_knn_mean",
    "item_knn_max",
)
#: `metadata.json` label mode of a candidates folder.
LABEL_MODE = "retriever_candidates"
#: Serving-time tables kept in the folder (user/item feature rows and history counts of the served retriever).
TABLES_DIR = "ranker"


# ------------------------------------------------------------------------------------------- pieces
def fold_of(rows: int, folds: int, seed: int) -> np.ndarray:
    """int8 [rows]: the cross-fitting fold of each train row, from (seed, row position) only."""
    return np.random.default_rng([seed, 0xF01D]).integers(folds, size=rows).astype(np.int8)


@dataclass
class History:
    """What a retriever trained on, as features: per vocabulary row counts relative to the mean
    (1 = average), each user's train items, and the items' co-occurrence (cosine) in those rows."""

    user: np.ndarray  # float32 [U]
    item: np.ndarray  # float32 [I]
    indptr: np.ndarray  # int64 [U+1]: CSR of each user's train items
    items: np.ndarray  # int64: item rows
    sim: np.ndarray  # float32 [I, I]: cosine of the item columns of the user × item matrix, diagonal 0
    ease: np.ndarray | None = None  # float32 [I, I]: EASE weights (data.candidates.item_item_lambda), or None


def history_of(sparse: np.ndarray, uc: int, ic: int, nu: int, ni: int, lam: float | None = None) -> History:
    """History of the train rows `sparse` (a retriever's training data); EASE weights fit on the same
    rows when `lam` (data.candidates.item_item_lambda) is given.

    Counts are relative to the mean, so a fold retriever (trained on (K-1)/K of the rows) and the
    served one give features on the same scale. The item × item table is dense ([I, I] float32): an
    ML-100K-sized feature (11 MB there)."""
    n = max(len(sparse), 1)
    user = np.bincount(sparse[:, uc], minlength=nu).astype(np.float32) * (nu - 1) / n
    item = np.bincount(sparse[:, ic], minlength=ni).astype(np.float32) * (ni - 1) / n
    keys = np.unique(_pair_keys(sparse[:, uc], sparse[:, ic], ni))
    rows, cols = keys // ni, keys % ni
    indptr = np.r_[0, np.bincount(rows, minlength=nu).cumsum()].astype(np.int64)
    x = np.zeros((nu, ni), np.float32)
    x[rows, cols] = 1.0
    co = x.T @ x
    norm = np.sqrt(np.maximum(np.diag(co), 1.0))
    sim = co / norm[:, None] / norm[None, :]
    np.fill_diagonal(sim, 0.0)
    ease = None if lam is None else _ease(co, lam)
    return History(user, item, indptr, cols.astype(np.int64), sim.astype(np.float32), ease)


def _ease(co: np.ndarray, lam: float) -> np.ndarray:
    """float32 [I, I] EASE weights from the item co-occurrence counts history_of has built (exact
    integers in float32 below 2^24 users an item)."""
    import torch

    from recsys.retrieval.item_item import ease_from_gram

    return ease_from_gram(torch.from_numpy(co.astype(np.float64)), lam).float().numpy()


def with_known(hist: History, sparse: np.ndarray, uc: int, ic: int, nu: int, ni: int) -> History:
    """`hist` with each user's items read from the rows `sparse` instead (e.g. train and val when the
    lists being scored exclude both): the items a user is known to have when the list is built."""
    from dataclasses import replace

    keys = np.unique(_pair_keys(sparse[:, uc], sparse[:, ic], ni))
    indptr = np.r_[0, np.bincount(keys // ni, minlength=nu).cumsum()].astype(np.int64)
    return replace(hist, indptr=indptr, items=(keys % ni).astype(np.int64))


def dense_names(hist: History) -> tuple[str, ...]:
    """Dense feature names of candidate rows scored with `hist` (DENSE, then the item-to-item ones)."""
    from recsys.retrieval.item_item import ITEM_ITEM_DENSE

    return DENSE if hist.ease is None else DENSE + ITEM_ITEM_DENSE


def knn_features(u: np.ndarray, i: np.ndarray, hist: History) -> np.ndarray:
    """float32 [n, 2]: mean and max cosine of each candidate item with the user's train items
    (item-to-item collaborative evidence the Two-Tower's dot product does not express)."""
    out = np.zeros((len(u), 2), np.float32)
    order = np.argsort(u, kind="stable")
    users, starts = np.unique(u[order], return_index=True)
    for user, rows in zip(users, np.split(order, starts[1:]), strict=True):
        seen = hist.items[hist.indptr[user] : hist.indptr[user + 1]]
        if len(seen):
            s = hist.sim[np.ix_(i[rows], seen)]
            out[rows, 0], out[rows, 1] = s.mean(1), s.max(1)
    return out


def dense_features(
    user_code: np.ndarray, score: np.ndarray, rank: np.ndarray, u: np.ndarray, i: np.ndarray, hist: History
) -> np.ndarray:
    """float32 [n, len(DENSE)] of candidate rows: `user_code` groups rows by user (any integer code),
    `score`/`rank` are the retrieval ones, `u`/`i` the vocabulary rows the History is indexed by."""
    top = np.full(int(user_code.max(initial=-1)) + 1, -np.inf, np.float32)
    np.maximum.at(top, user_code, score.astype(np.float32))
    base = np.stack(
        [
            score,
            top[user_code] - score,
            np.log(rank.astype(np.float32)),
            np.log1p(hist.user[u]),
            np.log1p(hist.item[i]),
        ],
        axis=1,
    )
    parts = [base, knn_features(u, i, hist)]
    if hist.ease is not None:
        from recsys.retrieval.item_item import item_item_features

        parts.append(item_item_features(user_code, u, i, hist.indptr, hist.items, hist.ease))
    return np.concatenate(parts, axis=1).astype(np.float32)


def feature_tables(meta: Metadata, arrays: list[dict[str, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """int64 [U, S] and [I, S]: a user (item) row's values of the user (item) columns, 0 elsewhere,
    from its last row in `arrays`. Every sparse column must be the user's or the item's."""
    from recsys.evaluate import _entity_table

    names = [f.name for f in meta.sparse_features]
    user = [names.index(n) for n in [meta.user_feature or "", *meta.user_side_features]]
    item = [names.index(n) for n in [meta.item_feature or "", *meta.item_side_features]]
    other = [n for j, n in enumerate(names) if j not in user + item]
    if other:
        raise UserError(
            f"data.candidates: the retriever's data has columns {other} that describe neither the user "
            "nor the item; a candidate pair has only user and item features"
        )
    out = []
    for cols in (user, item):
        full = np.zeros((meta.sparse_features[cols[0]].num_embeddings, len(names)), np.int64)
        full[:, cols] = _entity_table(arrays, cols[0], cols, len(full))
        out.append(full)
    return out[0], out[1]


@dataclass
class CandidateRows:
    """One split's candidate rows before writing (all arrays [n]; rows are vocabulary rows)."""

    user: np.ndarray  # int64
    item: np.ndarray  # int64
    rank: np.ndarray  # int32, 1 = the retriever's best
    score: np.ndarray  # float32, the retrieval score
    label: np.ndarray  # float32, 1 = the pair is a held-out interaction
    fold: np.ndarray  # int8, the fold whose retriever scored it (-1: the served retriever)
    dense: np.ndarray  # float32 [n, len(DENSE)]


def _pair_keys(u: np.ndarray, i: np.ndarray, ni: int) -> np.ndarray:
    return u.astype(np.int64) * ni + i.astype(np.int64)


def score_candidates(
    ret: Retriever, users: np.ndarray, positives: np.ndarray, top_n: int, hist: History, fold: int
) -> CandidateRows:
    """The top-N unseen items of `users` (vocabulary rows) from `ret`, labelled by `positives`
    (sorted pair keys user * I + item of the held-out rows)."""
    from recsys.data.metadata import read_vocab

    meta, prepared = ret.meta, ret.prepared
    vu = read_vocab(prepared, meta.sparse_features[meta.sparse_index(meta.user_feature or "")])
    vi = read_vocab(prepared, meta.sparse_features[meta.sparse_index(meta.item_feature or "")])
    item_row = {raw: r for r, raw in enumerate(vi)}
    table = ret.recommend([vu[r] for r in users], top_n)
    fallback = table.column("fallback").to_numpy(zero_copy_only=False)
    if fallback.any():  # every user with a held-out row has train rows, so an embedding
        raise UserError(f"run {ret.run.run_id}: no embedding for some users with train rows; retrain it")
    counts = _rows_per_user(table, len(users))
    u = np.repeat(users, counts)
    i = np.array([item_row[x] for x in table.column("item").to_pylist()], np.int64)
    rank = table.column("rank").to_numpy().astype(np.int32)
    score = table.column("score").to_numpy().astype(np.float32)
    keys = _pair_keys(u, i, len(vi))
    at = np.minimum(np.searchsorted(positives, keys), max(len(positives) - 1, 0))
    label = (positives[at] == keys).astype(np.float32) if len(positives) else np.zeros(len(u), np.float32)
    code = np.repeat(np.arange(len(users)), counts)
    dense = dense_features(code, score, rank, u, i, hist)
    return CandidateRows(u, i, rank, score, label, np.full(len(u), fold, np.int8), dense)


def _rows_per_user(table: pa.Table, n_users: int) -> np.ndarray:
    """Rows of each user of a recommend table, in its user order (users come in the order asked)."""
    rank = table.column("rank").to_numpy()
    starts = np.flatnonzero(rank == 1)
    if len(starts) != n_users:
        raise UserError(f"the retriever returned lists for {len(starts)} of {n_users} users")
    return np.diff(np.r_[starts, len(rank)])


def _concat(parts: list[CandidateRows]) -> CandidateRows:
    fields = CandidateRows.__dataclass_fields__
    return CandidateRows(**{f: np.concatenate([getattr(p, f) for p in parts]) for f in fields})


# ------------------------------------------------------------------------------------ fold retrievers
def write_fold_folder(
    prepared: str, meta: Metadata, cfg: Config, train: dict[str, np.ndarray], held: np.ndarray, out: Path
) -> Path:
    """A prepared folder for one fold's retriever: train = the rows not `held`, test = the `held` rows,
    val, vocabularies and settings as in `prepared` (so the run's own config trains on it)."""
    from recsys.data.mds import write_split
    from recsys.data.metadata import SplitInfo, write_metadata

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(Path(prepared, "vocab"), out / "vocab")
    shutil.copytree(Path(prepared, "val"), out / "val")
    splits = {"val": meta.splits["val"]}
    for split, keep in (("train", ~held), ("test", held)):
        label, dense, sparse = train["label"][keep], train["dense"][keep], train["sparse"][keep]
        blocks = write_split(
            out / split,
            label,
            dense,
            sparse,
            meta.block_size,
            cfg.data.compression,
            cfg.data.shard_size_limit,
        )
        splits[split] = SplitInfo(rows=len(label), blocks=blocks, positives=int((label > 0).sum()))
    note = f"cross-fitting fold of {prepared}: its train rows of this fold are this test split"
    write_metadata(
        out,
        meta.model_copy(update={"splits": splits, "read_notes": [*meta.read_notes, note]}),
    )
    return out


def train_fold_retrievers(
    run: TwoTowerRun,
    prepared: str,
    meta: Metadata,
    train: dict[str, np.ndarray],
    folds: np.ndarray,
    out: Path,
) -> list[str]:
    """Train one retriever per fold (the run's config on the other folds' train rows); their run ids."""
    import contextlib

    from recsys.train import train as train_model

    ids = []
    k_all = int(folds.max()) + 1
    for k in range(k_all):
        folder = write_fold_folder(prepared, meta, run.cfg, train, folds == k, out / f"fold-{k}")
        cfg = run.cfg.model_copy(deep=True)
        cfg.data.prepared_dir = str(folder)
        cfg.train.checkpoint.dir = str(out / f"fold-{k}" / "checkpoints")
        cfg.train.checkpoint.keep_last = 1
        print(f"candidates: training the fold {k + 1}/{k_all} retriever on {folder} …", file=sys.stderr)
        tags = {"candidates.retriever_run_id": run.run_id, "candidates.fold": f"{k}/{k_all}"}
        log = out / f"fold-{k}" / "train.log"
        # The trainer's tables and progress would bury the command's lines: they go to a log file.
        with open(log, "w") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            result = train_model(cfg, resume="never", extra_tags=tags)
        if result.run_id is None:
            raise UserError(f"fold {k} retriever: training logged no MLflow run (see {log})")
        ids.append(result.run_id)
    return ids


# ------------------------------------------------------------------------------------------- build
def _held_out(
    sparse: np.ndarray, label: np.ndarray, uc: int, ic: int, ni: int
) -> tuple[np.ndarray, np.ndarray]:
    """(user rows with a positive, sorted pair keys of the positives) of held-out rows; OOV ids skipped."""
    ok = (label > 0) & (sparse[:, uc] > 0) & (sparse[:, ic] > 0)
    return np.unique(sparse[ok, uc]), np.unique(_pair_keys(sparse[ok, uc], sparse[ok, ic], ni))


def fold_runs_of(run: TwoTowerRun, given: list[str] | None, folds: int) -> list[str] | None:
    """Check `--fold-runs` (one retriever per fold, trained by an earlier `data candidates` of this run)."""
    if given is None:
        return None
    if len(given) != folds:
        raise UserError(
            f"--fold-runs: {len(given)} run ids for data.candidates.folds {folds}; pass one per fold"
        )
    client = run.client()
    for k, rid in enumerate(given):
        tags = client.get_run(rid).data.tags
        want = (run.run_id, f"{k}/{folds}")
        got = (tags.get("candidates.retriever_run_id"), tags.get("candidates.fold"))
        if got != want:
            raise UserError(
                f"--fold-runs: run {rid} is fold {got[1]} of retriever {got[0]}, not fold {want[1]} of "
                f"{run.run_id}; leave --fold-runs out to train them"
            )
    return given


@dataclass
class Candidates:
    """What `candidate_rows` scored: rows per split and what writing them needs."""

    run: TwoTowerRun
    meta: Metadata  # the retriever's data
    rows: dict[str, CandidateRows]
    fold_runs: list[str]
    tables: tuple[np.ndarray, np.ndarray]  # feature_tables of the retriever's data
    history: History  # of the served retriever (all train rows)


def refuse_history_retriever(run: TwoTowerRun) -> None:
    """Cross-fitting needs user vectors that never saw a fold's held-out items; a history-reading
    retriever's vectors pool the user's items, held-out ones included, so it is refused (one line)."""
    from recsys.data.history import model_uses_history

    if model_uses_history(run.cfg):
        raise UserError(
            f"data candidates: run {run.run_id} reads histories (data.history / a sequential model), whose "
            "user vectors would pool the held-out items of each fold; build candidates from a retriever "
            "without data.history (e.g. the shipped movielens_100k_recbole Two-Tower)"
        )


def candidate_rows(
    cfg: Config, run_id: str, uri: str | None = None, fold_runs: list[str] | None = None
) -> Candidates:
    """Score every split's candidate rows of Two-Tower run `run_id` (fold retrievers trained unless given)."""
    from recsys.data.metadata import read_metadata
    from recsys.evaluate import read_all_splits
    from recsys.retrieval.recommend import open_retriever
    from recsys.retrieval.runs import open_run

    spec = cfg.data.candidates
    run = open_run(run_id, uri)
    refuse_history_retriever(run)
    uri, prepared = run.tracking_uri, run.cfg.data.prepared_dir
    meta = read_metadata(prepared)
    arrays = read_all_splits(run.cfg, meta)
    train = arrays["train"]
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    nu, ni = meta.sparse_features[uc].num_embeddings, meta.sparse_features[ic].num_embeddings
    tables = feature_tables(meta, list(arrays.values()))  # checks the columns before any training
    lam = spec.item_item_lambda
    if lam is not None:
        from recsys.retrieval.item_item import check_items

        check_items(ni, spec.item_item_max_items)
    folds = fold_of(len(train["label"]), spec.folds, spec.seed)
    ids = fold_runs_of(run, fold_runs, spec.folds) or train_fold_retrievers(
        run, prepared, meta, train, folds, Path(f"{cfg.data.prepared_dir}-folds")
    )
    parts = []
    for k, rid in enumerate(ids):
        held = folds == k
        users, positives = _held_out(train["sparse"][held], train["label"][held], uc, ic, ni)
        hist = history_of(train["sparse"][~held], uc, ic, nu, ni, lam)  # what fold k's retriever saw
        parts.append(score_candidates(open_retriever(rid, uri), users, positives, spec.top_n, hist, k))
    rows = {"train": _concat(parts)}
    hist = history_of(train["sparse"], uc, ic, nu, ni, lam)
    for split, exclude in (("val", ("train",)), ("test", ("train", "val"))):
        users, positives = _held_out(arrays[split]["sparse"], arrays[split]["label"], uc, ic, ni)
        ret = open_retriever(run_id, uri, exclude)
        # A user's known items are those the list excludes (test: train and val), as at serving.
        known = np.concatenate([arrays[s]["sparse"] for s in exclude])
        rows[split] = score_candidates(
            ret, users, positives, spec.top_n, with_known(hist, known, uc, ic, nu, ni), -1
        )
    return Candidates(run, meta, rows, ids, tables, hist)


def build_candidates(
    cfg: Config,
    run_id: str,
    uri: str | None = None,
    fold_runs: list[str] | None = None,
    overwrite: bool = False,
) -> Metadata:
    """Write cfg.data.prepared_dir: ranker rows from Two-Tower run `run_id`'s top-N (module docstring)."""
    from recsys.data.metadata import data_settings, write_metadata
    from recsys.data.prepare import check_output

    spec = cfg.data.candidates
    if not spec.top_n:
        raise UserError(
            f"config {cfg.name}: data.candidates.top_n is 0; set it (e.g. 50) to build ranker rows"
        )
    out = Path(cfg.data.prepared_dir)
    check_output(out, overwrite)
    c = candidate_rows(cfg, run_id, uri, fold_runs)
    prepared = c.run.cfg.data.prepared_dir
    infos = write_candidates(out, prepared, cfg, c.rows, c.tables, c.history)
    label = {"mode": LABEL_MODE, "retriever_run_id": run_id, "fold_run_ids": c.fold_runs,
             "top_n": spec.top_n, "folds": spec.folds, "seed": spec.seed}  # fmt: skip
    note = (f"candidates: top-{spec.top_n} of Two-Tower run {run_id} ({prepared}); train rows from "
            f"{spec.folds} cross-fitted fold retrievers, val/test rows from the run itself")  # fmt: skip
    result = c.meta.model_copy(
        update={
            "name": cfg.name,
            "block_size": cfg.data.block_size,
            "dense_features": list(dense_names(c.history)),
            "splits": infos,
            "label": label,
            "read_notes": [*c.meta.read_notes, note],
            "settings": data_settings(cfg),
        }  # fmt: skip
    )
    write_metadata(out, result)
    print(
        f"candidates {out}: "
        + ", ".join(f"{s} {v.rows:,} rows ({v.positives:,} positives)" for s, v in infos.items())
        + f"; fold runs {','.join(c.fold_runs)}"
    )
    return result


def write_candidates(
    out: Path,
    prepared: str,
    cfg: Config,
    rows: dict[str, CandidateRows],
    tables: tuple[np.ndarray, np.ndarray],
    hist: History,
) -> dict[str, Any]:
    """MDS splits of the candidate rows (train shuffled, seeded), vocab/ and the serving tables."""
    from recsys.data.mds import write_split
    from recsys.data.metadata import SplitInfo

    user_table, item_table = tables
    out.mkdir(parents=True, exist_ok=True)
    shutil.copytree(Path(prepared, "vocab"), out / "vocab", dirs_exist_ok=True)
    infos = {}
    for split, r in rows.items():
        order = np.arange(len(r.label))
        if split == "train":
            order = np.random.default_rng(cfg.data.candidates.seed).permutation(len(order))
        sparse = user_table[r.user[order]] + item_table[r.item[order]]  # disjoint columns: the sum is the row
        blocks = write_split(
            out / split, r.label[order], r.dense[order], sparse, cfg.data.block_size,
            cfg.data.compression, cfg.data.shard_size_limit,
        )  # fmt: skip
        infos[split] = SplitInfo(rows=len(order), blocks=blocks, positives=int(r.label.sum()))
    save_tables(out / TABLES_DIR, user_table, item_table, hist)
    return infos


def save_tables(folder: Path, user_table: np.ndarray, item_table: np.ndarray, hist: History) -> None:
    """The served retriever's feature rows and history counts (what scoring a new pair needs)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, a in (("user_features", user_table), ("item_features", item_table),
                    *_history_arrays(hist)):  # fmt: skip
        np.save(folder / f"{name}.npy", a)
    (folder / "README").write_text(json.dumps({"dense": list(dense_names(hist))}) + "\n")


def _history_arrays(hist: History) -> list[tuple[str, np.ndarray]]:
    fields = [(f, getattr(hist, f)) for f in History.__dataclass_fields__]
    return [("history_" + f, a) for f, a in fields if a is not None]  # ease: only when fit


def load_tables(prepared: str | Path) -> tuple[np.ndarray, np.ndarray, History]:
    """(user feature rows, item feature rows, History) saved by `save_tables` in a candidates folder."""
    folder = Path(prepared, TABLES_DIR)
    names = ["user_features", "item_features", *(f"history_{f}" for f in History.__dataclass_fields__)]
    optional = {"history_ease"}  # written only by a build with data.candidates.item_item_lambda
    try:
        a = {
            n: np.load(folder / f"{n}.npy")
            for n in names
            if n not in optional or Path(folder, f"{n}.npy").exists()
        }
    except OSError as e:
        raise UserError(
            f"{folder}: {e.strerror or e}; rebuild the ranker data: recsys data candidates --overwrite …"
        ) from None
    hist = History(**{f: a.get(f"history_{f}") for f in History.__dataclass_fields__})
    return a["user_features"], a["item_features"], hist

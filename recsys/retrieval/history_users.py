"""User vectors from a request's history: the one path `recsys recommend --history-file` and the served
pyfunc share, so both give the same lists for the same history.

- `HistoryEncoder` holds the run's plain (unsharded) model, its user and item vocabularies and each
  known user's side-feature rows. `user_vectors(users, histories)` maps raw item ids to item rows
  (unknown items dropped and counted), keeps the last L (most recent last), looks the user's side
  features up (a user never seen: the OOV row 0 for each) and runs the model's user tower — the same
  `user_embeddings` the export uses, with the popularity-prior coordinate the index expects.
- `recommend_histories` searches those vectors with `search_unseen` at a depth fixed per run (so a
  row's list never depends on the other rows of its call), excluding the user's seen items (when the
  run knows the user) and the given items.
- Only runs whose model reads `history` (model.kind sequential, or a Two-Tower with history_pooling)
  can; `require_history_model` refuses the others with one line.

A served model carries the encoder as a folder (`save` / `HistoryEncoder.load`): the resolved config,
metadata.json, the model's state dict, the two vocabularies and the user side-feature table.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.retrieval.index import ItemIndex

#: Files of a saved encoder folder.
CONFIG_FILE, META_FILE, STATE_FILE = "config.yaml", "metadata.json", "model.pt"
ITEMS_FILE, USERS_FILE, TABLE_FILE = "items.json", "users.json", "user_table.npy"


def reads_history(cfg: Config) -> bool:
    """Whether the run's model computes user vectors from a history."""
    from recsys.data.history import model_uses_history

    return model_uses_history(cfg)


def require_history_model(cfg: Config, what: str) -> None:
    """Refuse `what` (a history given in a request or a file) for a model that does not read histories."""
    if not reads_history(cfg):
        raise UserError(
            f"{what}: config {cfg.name}'s model (model.kind {cfg.model.kind}, "
            f"model.two_tower.history_pooling {cfg.model.two_tower.history_pooling}) does not read "
            "histories; use a run of model.kind sequential or a Two-Tower with history_pooling"
        )


@dataclass
class HistoryVectors:
    """User vectors of request rows and what was dropped from their histories."""

    vectors: np.ndarray  # float32 [N, E], the index's space (prior coordinate included)
    item_rows: list[np.ndarray]  # per row, the item vocabulary rows used (unknown ids dropped)
    unknown: np.ndarray  # int64 [N], item ids per row not in the run's vocabulary
    known_user: np.ndarray  # bool [N], the run's vocabulary knows the user


@dataclass
class HistoryEncoder:
    """A run's user tower with what it needs to turn (raw user id, raw item ids) into a user vector."""

    cfg: Config
    model: Any  # the plain TwoTower (eval mode)
    item_row: dict[str, int]  # raw item id → vocabulary row
    user_row: dict[str, int]  # raw user id → vocabulary row
    user_features: list[str]  # the user tower's id features
    user_table: np.ndarray  # int64 [users, len(user_features)]: each user row's feature rows
    length: int  # L: the most recent items kept

    def user_vectors(self, users: list[str], histories: list[list[str]]) -> HistoryVectors:
        """Vectors of users `users` (raw ids) given their histories (raw item ids, most recent last)."""
        import torch

        n, L = len(users), self.length
        rows, unknown = [], np.zeros(n, np.int64)
        hist, lengths = np.zeros((n, L), np.int64), np.zeros(n, np.int64)
        for j, items in enumerate(histories):
            mapped = [self.item_row.get(str(i), 0) for i in items]
            # Row 0 is OOV: an item the run never trained on says nothing about the user.
            kept = np.array([r for r in mapped if r > 0], np.int64)
            unknown[j] = len(mapped) - len(kept)
            rows.append(kept)
            recent = kept[-L:]
            hist[j, : len(recent)], lengths[j] = recent, len(recent)
        urow = np.array([self.user_row.get(u, 0) for u in users], np.int64)
        side = self.user_table[urow] if self.user_features else np.zeros((n, 0), np.int64)
        ids = {f: torch.from_numpy(side[:, c]) for c, f in enumerate(self.user_features)}
        with torch.no_grad():
            vec = self.model.user_embeddings(ids, (torch.from_numpy(hist), torch.from_numpy(lengths)))
        vec = vec.float().numpy()
        if self.cfg.model.kind == "two_tower" and self.cfg.model.two_tower.popularity_prior:
            vec = np.concatenate([vec, np.ones((n, 1), np.float32)], axis=1)  # as retrieval_embeddings
        return HistoryVectors(np.ascontiguousarray(vec, np.float32), rows, unknown, urow > 0)

    def save(self, folder: Path, prepared: str | Path) -> Path:
        """Write the encoder to `folder` (what a served model carries); `prepared` gives metadata.json."""
        import torch

        from recsys.config import dump_config
        from recsys.data.metadata import metadata_path

        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(dump_config(self.cfg))
        shutil.copyfile(metadata_path(prepared), folder / META_FILE)
        torch.save(self.model.state_dict(), folder / STATE_FILE)
        for name, mapping in ((ITEMS_FILE, self.item_row), (USERS_FILE, self.user_row)):
            # By row, row 0 (OOV, not in the mapping) kept as an empty slot so rows stay rows.
            by_row = [""] * (max(mapping.values(), default=0) + 1)
            for raw, row in mapping.items():
                by_row[row] = raw
            (folder / name).write_text(json.dumps(by_row))
        np.save(folder / TABLE_FILE, self.user_table)
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> HistoryEncoder:
        """Read an encoder written by `save`."""
        import torch

        from recsys.config import load_config
        from recsys.data.metadata import read_metadata

        folder = Path(folder)
        cfg, meta = load_config(folder / CONFIG_FILE), read_metadata(folder)
        state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
        items, users = (json.loads((folder / f).read_text()) for f in (ITEMS_FILE, USERS_FILE))
        return _encoder(cfg, meta, state, items, users, np.load(folder / TABLE_FILE))


def _encoder(
    cfg: Config, meta: Any, state: dict[str, Any], items: list[str], users: list[str], table: np.ndarray
) -> HistoryEncoder:
    """Build the plain model of `cfg`, load the model part of `state` into it, wrap it."""
    from recsys.models.task import build_task

    task = build_task(cfg, meta, ebc_device="cpu", training=False)
    # Keys of `state` are the task's (model.…) or the model's own (a saved encoder).
    prefixed = {k if k.startswith("model.") else f"model.{k}": v for k, v in state.items()}
    missing, _ = task.load_state_dict(prefixed, strict=False)
    if any(k.startswith("model.") for k in missing):
        raise UserError(f"the logged model does not match config {cfg.name}: missing {missing[:3]}")
    model = task.model.eval()
    feats = [] if cfg.model.kind == "sequential" else list(cfg.model.two_tower.user_features)
    # Items listed by row, row 0 the OOV token: the mapping excludes it.
    return HistoryEncoder(
        cfg,
        model,
        {i: r for r, i in enumerate(items) if r > 0},
        {u: r for r, u in enumerate(users) if r > 0},
        feats,
        table,
        int(meta.history_length or 0),
    )


def open_encoder(cfg: Config, run_id: str, prepared: str) -> HistoryEncoder:
    """The history encoder of run `run_id` (its logged state dict) over prepared folder `prepared`."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import SPLITS, read_metadata, read_vocab
    from recsys.evaluate import _entity_table
    from recsys.tracking import load_logged_state

    meta = read_metadata(prepared)
    state = load_logged_state(cfg, run_id)
    uf, itf = meta.user_feature or "", meta.item_feature or ""
    users = read_vocab(prepared, meta.sparse_features[meta.sparse_index(uf)])
    items = read_vocab(prepared, meta.sparse_features[meta.sparse_index(itf)])
    feats = [] if cfg.model.kind == "sequential" else list(cfg.model.two_tower.user_features)
    names = [f.name for f in meta.sparse_features]
    arrays = [read_split_arrays(prepared, s, meta) for s in SPLITS]
    table = _entity_table(arrays, names.index(uf), [names.index(f) for f in feats], len(users))
    return _encoder(cfg, meta, state, items, users, table)


def read_history_file(path: str | Path) -> tuple[list[str], list[list[str]]]:
    """(users, histories) from Parquet/CSV rows (user, item[, timestamp]) or JSON lines
    {"user": ..., "history": [...]}; items most recent last (rows: by timestamp, ties by file order)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--history-file {path}: not found")
    if path.suffix in (".jsonl", ".json", ".ndjson"):
        return _read_jsonl(path)
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    # Ids are exact strings ("007" is not 7): read those columns as text.
    opts = pcsv.ConvertOptions(column_types={"user": pa.string(), "item": pa.string()})
    try:
        table = (
            pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path, convert_options=opts)
        )
    except Exception as e:  # noqa: BLE001 — pyarrow raises several types for an unreadable file
        raise UserError(f"--history-file {path}: cannot read it as Parquet/CSV ({e})") from None
    missing = [c for c in ("user", "item") if c not in table.column_names]
    if missing:
        raise UserError(
            f"--history-file {path}: no column(s) {', '.join(missing)} (columns: "
            f"{', '.join(table.column_names)}); expected user, item[, timestamp]"
        )
    from recsys.retrieval.raw_ids import id_column

    users, items = (id_column(table, c, f"--history-file {path}") for c in ("user", "item"))
    order = np.arange(len(users))
    if "timestamp" in table.column_names:
        nulls = table.column("timestamp").is_null().to_numpy(zero_copy_only=False)
        if nulls.any():
            raise UserError(
                f"--history-file {path}: row {int(np.argmax(nulls)) + 1}: timestamp is null; "
                "give every row a timestamp, or leave the column out (rows then keep file order)"
            )
        ts = np.asarray(table.column("timestamp").to_numpy(zero_copy_only=False))
        order = np.argsort(ts, kind="stable")  # ties keep file order
    out: dict[str, list[str]] = {}
    for r in order:
        out.setdefault(users[r], []).append(items[r])
    return list(out), list(out.values())


def _read_jsonl(path: Path) -> tuple[list[str], list[list[str]]]:
    """(users, histories) of a JSON lines file; a bad line → one message naming it."""
    users, histories = [], []
    from recsys.text_lines import read_lines

    for n, line in enumerate(read_lines(path, "--history-file"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            user, hist = rec["user"], rec["history"]
            if not isinstance(hist, list):
                raise TypeError("history is not a list")
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(
                f'{path}:{n}: expected {{"user": "...", "history": ["item", ...]}} ({type(e).__name__}: {e})'
            ) from None
        users.append(_jsonl_id(user, path, n, "user"))
        histories.append([_jsonl_id(i, path, n, f"history item {j}") for j, i in enumerate(hist, 1)])
    return users, histories


def _jsonl_id(value: Any, path: Path, line: int, what: str) -> str:
    """A JSON value as a raw id; null, "" or a non-id → one line naming the file, line and field."""
    from recsys.retrieval.raw_ids import raw_id, why_not

    rid = raw_id(value)
    if rid is None:
        raise UserError(f"{path}:{line}: {what} is {why_not(value)}; write it as a non-empty id")
    return rid


def request_seen(
    seen: tuple[np.ndarray, np.ndarray], user_pos: np.ndarray, given: list[np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """A CSR over request rows: the user's seen items (`user_pos` ≥ 0 into `seen`) plus the given
    items' index positions (`given`)."""
    indptr, items = seen
    parts = []
    for p, g in zip(user_pos, given, strict=True):
        own = items[indptr[p] : indptr[p + 1]] if p >= 0 else np.zeros(0, np.int64)
        parts.append(np.unique(np.concatenate([own, g[g >= 0]])))
    out = np.zeros(len(parts) + 1, np.int64)
    out[1:] = np.cumsum([len(x) for x in parts])
    return out, np.concatenate([np.zeros(0, np.int64), *parts])


def recommend_histories(
    encoder: HistoryEncoder,
    index: ItemIndex,
    seen: tuple[np.ndarray, np.ndarray],
    user_pos: dict[str, int],
    users: list[str],
    histories: list[list[str]],
    k: int,
    exact: Callable[[], ItemIndex],
    depth: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(scores [N, k], index positions [N, k] with -1 padding, unknown item counts [N]) of request
    rows: vectors from the histories, the user's seen items (`seen` by `user_pos`) and the given items
    excluded. `depth` is the first search depth, the same for every call of a run."""
    from recsys.retrieval.search import search_unseen

    hv = encoder.user_vectors(users, histories)
    pos_of_row = np.full(max(int(index.item_rows.max(initial=0)) + 1, 1), -1, np.int64)
    pos_of_row[index.item_rows] = np.arange(len(index.item_rows))
    given = [pos_of_row[r[r < len(pos_of_row)]] for r in hv.item_rows]
    pos = np.array([user_pos.get(u, -1) for u in users], np.int64)
    req = request_seen(seen, pos, given)
    scores, found = search_unseen(index, hv.vectors, np.arange(len(users)), req, k, exact, depth)
    return scores, found, hv.unknown

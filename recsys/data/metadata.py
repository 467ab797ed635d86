"""The prepared-data contract shared by `data prepare`, the Spark converter, the loader and the trainer.

A prepared folder holds::

    metadata.json            this module's Metadata (schema, vocab sizes, counts, checksums, bad rows)
    vocab/<feature>.txt      line k = the raw id of embedding row k; line 0 is the OOV row ("<OOV>")
    train/ val/ test/        MDS datasets; one MDS sample = one *block* of up to `block_size` rows

Every MDS sample has three columns, all numpy arrays with the block's rows first:
    label   float32 [n]        binary label (0/1) after label binarization
    dense   float32 [n, D]     log(1+x) of the dense features, missing → 0; MDS cannot store empty
                               arrays, so with D = 0 it holds [n, 1] zeros: readers keep the first
                               len(dense_features) columns
    sparse  int64   [n, S]     embedding row of each sparse feature (vocabulary-mapped; 0 = OOV/missing)

With data.history (recsys.data.history) a sample has two more columns:
    history       int64   [n, L]     the user's previous items (item rows, strictly earlier in time, ties
                                     by file order), oldest first, left-aligned, zero beyond the length
    history_rank  int64   [n]        the user's earlier events of known parts (recsys.data.history); length min(rank, L)
The loader streams them as the jagged KeyedJaggedTensor feature `history` (HISTORY_FEATURE).

Interaction data (Two-Tower) uses the same layout: its sparse features include the user and item
columns, named by `user_feature` / `item_feature`, and any side features joined onto each row, named
by `user_side_features` / `item_side_features` (a multi-valued field such as genres is several
single-valued features `genre_0 … genre_{k-1}`, padded with row 0; see recsys.data.readers).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from recsys.errors import DataError, UserError

if TYPE_CHECKING:
    from recsys.config import Config

FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")
OOV_TOKEN = "<OOV>"
MDS_COLUMNS = {"label": "ndarray:float32", "dense": "ndarray:float32", "sparse": "ndarray:int64"}
HISTORY_COLUMNS = {"history": "ndarray:int64", "history_rank": "ndarray:int64"}
HISTORY_FEATURE = "history"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SparseFeature(_Model):
    """One embedded categorical feature."""

    name: str = Field(description="Feature (and embedding table) name.")
    num_embeddings: int = Field(description="Rows of its table: vocabulary size + 1 (row 0 = OOV/missing).")
    vocab_file: str = Field(description="Vocabulary file, relative to the prepared folder.")
    table: str = Field(
        "exact",
        description="exact (vocabulary rows), capped (frequent ids + hashed shared rows) or "
        "managed_collision (the data holds id hashes; rows assigned while training).",
    )
    hashed_rows: int = Field(0, description="capped: the last rows of the table, shared by hashed ids.")
    id_hash: str | None = Field(None, description="capped/managed_collision: the hash applied to raw ids.")
    collisions: dict[str, int] | None = Field(
        None, description="capped: train ids and values (row occurrences) sharing a row, with totals."
    )


class SplitInfo(_Model):
    """Counts of one split."""

    rows: int = Field(description="Rows in the split.")
    blocks: int = Field(description="MDS samples (blocks) in the split.")
    positives: int = Field(description="Rows with label 1.")


class BadRows(_Model):
    """Malformed rows skipped from one source file (only with skip_bad_rows)."""

    count: int = Field(0, description="Rows skipped.")
    examples: list[str] = Field(default_factory=list, description="The first few, as `file:line: reason`.")


class SourceFile(_Model):
    """A raw input file and what was read from it."""

    path: str = Field(description="Path as given in the config.")
    sha256: str = Field(description="Checksum of the file's bytes.")
    rows: int = Field(description="Rows read (good ones).")
    bad_rows: BadRows = Field(default_factory=BadRows, description="Skipped malformed rows.")


class LineageEntry(_Model):
    """An earlier prepared folder in a chain of windows (see recsys.data.lineage)."""

    path: str = Field(description="The folder, as data.window.previous named it.")
    metadata_sha256: str = Field(description="Checksum of its metadata.json: the folder's identity.")
    name: str = Field(description="Config name that prepared it.")
    since: float | None = Field(
        None, description="Its window's first timestamp (epoch s, inclusive); null: unbounded."
    )
    until: float | None = Field(None, description="Its window's end (epoch s, exclusive); null: unbounded.")


class WindowInfo(_Model):
    """The time window a folder holds and how its vocabularies grew from the previous folder."""

    since: float | None = Field(
        None, description="First timestamp kept (epoch s, inclusive); null: unbounded."
    )
    until: float | None = Field(
        None, description="Timestamps kept are before this (epoch s); null: unbounded."
    )
    rows_in_window: int = Field(0, description="Source rows inside [since, until) (all rows without bounds).")
    rows_before: int = Field(0, description="Source rows before since (left out).")
    rows_after: int = Field(0, description="Source rows at or after until (left out).")
    rows_without_timestamp: int = Field(
        0, description="Source rows with no timestamp (left out of a window)."
    )
    previous: LineageEntry | None = Field(None, description="The folder whose vocabularies this one extends.")
    rows_inherited: dict[str, int] = Field(
        default_factory=dict,
        description="Per feature, rows kept from the previous folder (capped: owned rows; managed_collision: listed ids).",
    )
    rows_added: dict[str, int] = Field(
        default_factory=dict, description="Per feature, rows appended for ids new in this window."
    )


class Metadata(_Model):
    """metadata.json of a prepared folder."""

    format_version: int = Field(FORMAT_VERSION, description="Version of this layout.")
    name: str = Field(description="Config name that produced it.")
    kind: str = Field(description="'ctr' (DLRM rows) or 'interactions' (user/item pairs).")
    block_size: int = Field(description="Rows per MDS sample.")
    dense_features: list[str] = Field(description="Dense feature names, in column order.")
    sparse_features: list[SparseFeature] = Field(description="Sparse features, in column order.")
    user_feature: str | None = Field(None, description="Sparse feature holding the user id (interactions).")
    item_feature: str | None = Field(None, description="Sparse feature holding the item id (interactions).")
    user_side_features: list[str] = Field(
        default_factory=list, description="Sparse features describing the user (joined by user id)."
    )
    item_side_features: list[str] = Field(
        default_factory=list, description="Sparse features describing the item (joined by item id)."
    )
    read_notes: list[str] = Field(
        default_factory=list,
        description="What reading changed beyond bad rows, with counts (missing side rows, dropped tokens).",
    )
    splits: dict[str, SplitInfo] = Field(description="Counts per split (train, val, test).")
    sources: list[SourceFile] = Field(description="Raw inputs with checksums and bad-row counts.")
    label: dict[str, object] = Field(default_factory=dict, description="The label settings applied.")
    synthetic: dict[str, object] | None = Field(
        None, description="For synthetic data: generator facts (e.g. bayes_auc)."
    )
    settings: dict[str, object] | None = Field(
        None,
        description="The data settings the content was prepared from (see data_settings); None in older folders.",
    )
    window: WindowInfo | None = Field(
        None, description="The time window and vocabulary growth (data.window); null when neither was set."
    )
    lineage: list[LineageEntry] = Field(
        default_factory=list,
        description="Earlier folders this one extends, oldest first (empty for a first window).",
    )
    history_length: int | None = Field(
        None, description="L of the history columns (data.history.length); None: the data has none."
    )

    def sparse_index(self, name: str) -> int:
        """Column of a sparse feature in the `sparse` array."""
        for i, f in enumerate(self.sparse_features):
            if f.name == name:
                return i
        raise UserError(
            f"sparse feature {name!r} is not in the data (have: {[f.name for f in self.sparse_features]})"
        )


# Where the output goes and how it is read back do not change what is prepared.
_NOT_CONTENT = {"prepared_dir", "raw_dir", "num_workers", "num_canonical_nodes", "shuffle_seed", "chunk_rows"}
# A window's bounds and previous folder are recorded in metadata.json `window`/`lineage`, and a run trains
# on the window folders it is given (train_dirs): neither is a setting the trainer's config must repeat.
_NOT_CONTENT |= {"window", "train_dirs"}


def data_settings(cfg: Config) -> dict[str, object]:
    """The part of cfg.data that determines a prepared folder's content (recorded in metadata.json)."""
    out = cfg.data.model_dump(mode="json", exclude=_NOT_CONTENT)
    if not cfg.data.negatives.per_positive:  # folders prepared before the field existed still match
        out.pop("negatives")
    if cfg.data.history is None:  # likewise for folders prepared before histories existed
        out.pop("history")
    elif cfg.data.history.rule == "causal":  # and before data.history.rule existed
        out["history"].pop("rule")  # type: ignore[union-attr]
    if not cfg.data.candidates.top_n:  # likewise for folders made before data.candidates
        out.pop("candidates")
    m = cfg.model
    if m.table_default.kind != "exact" or any(t.kind != "exact" for t in m.tables.values()):
        # How ids become rows is decided at prepare time; eviction settings act only while training.
        content = {"kind", "max_rows", "hashed_rows"}
        out["tables"] = {
            "default": m.table_default.model_dump(mode="json", include=content),
            **{k: t.model_dump(mode="json", include=content) for k, t in sorted(m.tables.items())},
        }
    return out


def metadata_path(prepared_dir: str | Path) -> Path:
    """Path of metadata.json inside a prepared folder."""
    return Path(prepared_dir) / "metadata.json"


def read_metadata(prepared_dir: str | Path) -> Metadata:
    """Load metadata.json, or say how to create it."""
    path = metadata_path(prepared_dir)
    if not path.is_file():
        raise UserError(f"{path}: not found; run `recsys data prepare --config …` first (data.prepared_dir)")
    try:
        return Metadata.model_validate(json.loads(path.read_bytes().decode("utf-8")))
    except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
        raise DataError(
            f"{path}: not a readable metadata.json ({_why(e)}); the prepared folder is damaged: "
            "re-run `recsys data prepare --overwrite` with its config"
        ) from None


def _why(e: Exception) -> str:
    """One line on what is wrong with a metadata.json."""
    if isinstance(e, ValidationError):
        errs = e.errors()
        first = errs[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        more = f" and {len(errs) - 1} more" if len(errs) > 1 else ""
        return f"{where}: {first['msg']}{more}"
    if isinstance(e, json.JSONDecodeError):
        return f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}"
    return f"not UTF-8: {e}"


def write_metadata(prepared_dir: str | Path, meta: Metadata) -> None:
    """Write metadata.json."""
    metadata_path(prepared_dir).write_text(meta.model_dump_json(indent=2) + "\n")


def read_vocab_file(path: str | Path) -> list[str]:
    """Raw ids by embedding row from a vocabulary file (index 0 is the OOV token).

    Ids are exact strings: split only on "\n" (str.splitlines would also split on \x1c, \x85,
    \u2028, … and shift every later row), and read without newline translation.
    """
    try:
        lines = Path(path).read_bytes().decode("utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 at byte {e.start}; re-run `recsys data prepare --overwrite`"
        ) from None
    if lines and lines[-1] == "":
        lines.pop()
    if not lines or lines[0] != OOV_TOKEN:
        raise DataError(
            f"{path}:1: expected the OOV token {OOV_TOKEN!r}; re-run `recsys data prepare --overwrite`"
        )
    return lines


def read_vocab(prepared_dir: str | Path, feature: SparseFeature) -> list[str]:
    """Raw ids by embedding row (index 0 is the OOV token), checked against the feature's table size.

    A managed-collision table's file lists its train ids instead (rows are assigned while training,
    recsys.data.hashing), so its length is not the table's."""
    path = Path(prepared_dir, feature.vocab_file)
    ids = read_vocab_file(path)
    if len(ids) != feature.num_embeddings and feature.table != "managed_collision":
        raise DataError(
            f"{path}: {len(ids)} rows, metadata.json says {feature.num_embeddings} for {feature.name!r}; "
            "the folder is inconsistent: re-run `recsys data prepare --overwrite`"
        )
    return ids

"""Chains of prepared windows: a folder extends an earlier one's vocabularies (data.window.previous).

Every id of the previous folder keeps its row and new ids are appended (recsys.data.vocab's
IdCounter.finish with `previous`), so row ids written in any earlier folder of the chain stay valid in
the newest one's tables. A folder's identity is the sha256 of its metadata.json (written last, never
rewritten); metadata.json's `lineage` lists the folders it extends, oldest first, and `window.previous`
the one it was grown from. Training on several folders (data.train_dirs) accepts only ancestors.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.hashing import UNUSED_TOKEN
from recsys.data.metadata import (
    LineageEntry,
    Metadata,
    SparseFeature,
    SplitInfo,
    WindowInfo,
    metadata_path,
    read_metadata,
    read_vocab,
)
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config, TableConfig


def metadata_sha256(folder: str | Path) -> str:
    """Checksum of a prepared folder's metadata.json (its identity in a lineage)."""
    return hashlib.sha256(metadata_path(folder).read_bytes()).hexdigest()


def entry(folder: str | Path, meta: Metadata) -> LineageEntry:
    """The lineage entry naming a prepared folder."""
    w = meta.window
    return LineageEntry(
        path=str(folder),
        metadata_sha256=metadata_sha256(folder),
        name=meta.name,
        since=w.since if w else None,
        until=w.until if w else None,
    )


def _same_folder(a: str | Path, b: str | Path) -> bool:
    return Path(a).resolve() == Path(b).resolve()


@dataclass
class Previous:
    """The earlier prepared folder a new window grows from (data.window.previous)."""

    path: Path
    meta: Metadata
    entry: LineageEntry

    @classmethod
    def open(cls, cfg: Config) -> Previous | None:
        """The previous folder of cfg (None when data.window.previous is unset); checked before reading."""
        prev = cfg.data.window.previous
        if prev is None:
            return None
        if _same_folder(prev, cfg.data.prepared_dir):
            raise UserError(
                f"data.window.previous: {prev} is data.prepared_dir itself; prepare the new window into a new folder"
            )
        if not metadata_path(prev).is_file():
            raise UserError(f"data.window.previous: {prev} holds no metadata.json (not a prepared folder)")
        meta = read_metadata(prev)
        return cls(Path(prev), meta, entry(prev, meta))

    def check_schema(
        self, sparse_names: list[str], dense_names: list[str], cfg: Config, specs: dict[str, TableConfig]
    ) -> None:
        """The new window must have the previous folder's features, block size and table kinds and sizes
        (`specs`: the non-exact tables of cfg, recsys.data.prepare.table_specs), else one clear error."""
        m, where = self.meta, f"data.window.previous ({self.path})"
        if sparse_names != [f.name for f in m.sparse_features]:
            raise UserError(
                f"{where}: sparse features {[f.name for f in m.sparse_features]} differ from this source's "
                f"{sparse_names}; a window must keep its predecessor's features"
            )
        if dense_names != m.dense_features:
            raise UserError(
                f"{where}: dense features {m.dense_features} differ from this source's {dense_names}"
            )
        if cfg.data.block_size != m.block_size:
            raise UserError(
                f"data.block_size: {cfg.data.block_size}, the previous folder has {m.block_size}; "
                "windows trained together need one block size"
            )
        for f in m.sparse_features:
            spec = specs.get(f.name)
            kind = "exact" if spec is None else spec.kind
            rows = None if spec is None else (spec.max_rows, spec.resolved_hashed_rows())
            was = None if f.table == "exact" else (f.num_embeddings, f.hashed_rows)
            if kind != f.table or (kind == "capped" and rows != was):
                raise UserError(
                    f"model.tables.{f.name}: {kind} {rows or ''} here, {f.table} {was or ''} in {self.path}; "
                    "a window keeps its predecessor's table kind and size"
                )

    def ids(self, name: str) -> pa.Array:
        """The ids owning rows 1.. of a feature in the previous folder, in row order."""
        feature = next(f for f in self.meta.sparse_features if f.name == name)
        ids = read_vocab(self.path, feature)[1:]
        if feature.table == "capped":  # the owned block: rows 1..keep, less its unused tail
            ids = ids[: feature.num_embeddings - 1 - feature.hashed_rows]
            while ids and ids[-1] == UNUSED_TOKEN:
                ids.pop()
        return pa.array(ids, pa.string())

    def lineage(self) -> list[LineageEntry]:
        """The new folder's lineage: the previous folder's, then the previous folder itself."""
        return [*self.meta.lineage, self.entry]


def owned_rows(feature: SparseFeature, ids: pa.Array) -> int:
    """Rows owned by single ids in a fitted feature: exact = every row but OOV; capped = the kept block."""
    if feature.table == "exact":
        return feature.num_embeddings - 1
    if feature.table == "capped":
        shared = pc.or_(pc.equal(ids, UNUSED_TOKEN), pc.starts_with(ids, "<HASHED "))
        return len(ids) - int(pc.sum(shared).as_py() or 0)
    return len(ids)


def window_info(record: dict, previous: Previous | None, grown: dict[str, tuple[int, int]]) -> WindowInfo:
    """metadata.json's `window`: the filter's record (recsys.data.window) plus the growth per feature."""
    return WindowInfo(
        **record,
        previous=previous.entry if previous else None,
        rows_inherited={k: v[0] for k, v in grown.items()},
        rows_added={k: v[1] for k, v in grown.items()},
    )


# ------------------------------------------------------------------------------ training on windows
def train_folders(cfg: Config, meta: Metadata) -> list[tuple[Path, Metadata]]:
    """The folders whose train splits a run reads, oldest first: data.train_dirs (ancestors of
    data.prepared_dir in its lineage, checked here) then data.prepared_dir, each with its Metadata."""
    newest = Path(cfg.data.prepared_dir)
    known = {e.metadata_sha256: at for at, e in enumerate(meta.lineage)}
    out: list[tuple[int, Path, Metadata]] = []
    for d in cfg.data.train_dirs:
        if _same_folder(d, newest):
            continue  # listed or not, prepared_dir is read once
        older = read_metadata(d)
        if metadata_sha256(d) not in known:
            raise UserError(
                f"data.train_dirs: {d} is not an ancestor of {newest} (its metadata.json checksum is not in "
                f"{newest}/metadata.json lineage: {[e.path for e in meta.lineage] or 'empty'}); its rows would "
                "not match the newest vocabularies: prepare it as an earlier window (data.window.previous)"
            )
        if older.block_size != meta.block_size:
            raise UserError(
                f"data.train_dirs: {d} has block size {older.block_size}, {newest} has {meta.block_size}"
            )
        out.append((known[metadata_sha256(d)], Path(d), older))
    if len({at for at, _, _ in out}) != len(out):
        raise UserError(f"data.train_dirs: a folder is listed twice ({cfg.data.train_dirs})")
    # Oldest first, whatever the listed order: "the last train row" of an id is then the newest one.
    return [(p, m) for _, p, m in sorted(out, key=lambda x: x[0])] + [(newest, meta)]


def train_split(cfg: Config, meta: Metadata) -> SplitInfo:
    """Rows, blocks and positives of the train splits a run reads together (train_folders)."""
    infos = [m.splits["train"] for _, m in train_folders(cfg, meta)]
    return SplitInfo(
        rows=sum(i.rows for i in infos),
        blocks=sum(i.blocks for i in infos),
        positives=sum(i.positives for i in infos),
    )

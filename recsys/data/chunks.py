"""The configured source as chunks of rows, each with its global position and split, re-read per pass.

`recsys data prepare` makes two passes (count ids on train, then map and write), so memory depends
on `data.chunk_rows` and the vocabularies, not on the row count. Every row's split is decided from
the row alone — random from (split seed, position), by_day from its day file, presplit from its
part — except leave_last_n, which needs each user's rows in time order: a first pass keeps, per user,
the keys of its last 2n events and its count (recsys.data.last_events: memory grows with the users,
not the rows), from which later passes decide each chunk's rows. Criteo/synthetic CTR TSVs and table
CSV/Parquet files stream from disk; MovieLens,
RecBole and Learning-from-Sets files (small, joined with side tables) are read whole once and cut
into chunks. data.negatives reads the same chunks: its sampling works on pass 1's spill, user
bucket by user bucket (recsys.data.negative_buckets), so it adds memory per chunk and per item only.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.data import splits as S
from recsys.data.last_events import LastEvents
from recsys.data.metadata import SourceFile
from recsys.data.readers import STREAMED_KINDS, Table, iter_source, read_source, slice_table
from recsys.data.window import WindowFilter
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)


@dataclass
class Chunk:
    """Consecutive rows of the source: rows start .. start + table.rows - 1, with their split."""

    table: Table
    start: int
    assign: np.ndarray  # int8 per row: splits.TRAIN / VAL / TEST

    @property
    def positions(self) -> np.ndarray:
        """Global row positions of the chunk (int64)."""
        return np.arange(self.start, self.start + self.table.rows, dtype=np.int64)


def _inner_source(spec: dict[str, Any], where: str) -> Any:
    from pydantic import TypeAdapter, ValidationError

    from recsys.config import Source

    if spec.get("kind") == "presplit":
        raise UserError(f"{where}: a presplit part cannot itself be presplit")
    try:
        return TypeAdapter(Source).validate_python(spec)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(p) for p in first["loc"][1:])
        raise UserError(f"{where}.{loc}: {first['msg']}") from None


def _day_files(src: Any, raw_dir: Any) -> int:
    """Number of day files of a by_day source (criteo or synthetic_ctr); file i is day i."""
    if src.kind == "criteo":
        return len(src.paths)
    if src.kind == "synthetic_ctr":
        from recsys.data.synth import raw_files

        return len(raw_files(src, raw_dir))
    raise UserError("data.split.mode by_day needs day files (data.source.kind criteo or synthetic_ctr)")


class ChunkReader:
    """Iterate the configured source as Chunks; every iteration is one pass over the files.

    After a full pass, `rows` is the number of rows and `sources` the files read (sha256, rows, bad
    rows) — recorded on the first pass only, so later passes do not hash the files again.
    """

    def __init__(self, cfg: Config) -> None:
        from recsys.data.synth import raw_dir_of

        self.cfg, self.raw_dir = cfg, raw_dir_of(cfg)
        self.chunk_rows = cfg.data.chunk_rows
        self.sources: list[SourceFile] = []
        self.rows = 0
        self._passes = 0
        self._whole: dict[str, Table] = {}  # small sources read whole, by part
        self._assign: LastEvents | None = None  # leave_last_n's per-user last events
        self.window = WindowFilter(cfg)  # data.window: rows outside [since, until) are not read on
        src, mode = cfg.data.source, cfg.data.split.mode
        self._days = 0
        if src.kind != "presplit":
            if mode == "by_day":
                self._days = _day_files(src, self.raw_dir)
                if self._days < 3:
                    raise UserError(
                        f"data.split.mode by_day needs at least 3 days (day files); got {self._days}: "
                        "add day files or use mode: random"
                    )
            elif mode == "presplit":
                raise UserError(f"data.split.mode {mode!r} does not fit data.source.kind {src.kind!r}")

    # ------------------------------------------------------------------------------------ tables
    def _tables_of(self, src: Any, part: str, sources: list[SourceFile] | None) -> Iterator[Table]:
        skip = self.cfg.data.skip_bad_rows
        if src.kind in STREAMED_KINDS:
            for t in iter_source(src, skip, self.chunk_rows, sources, self.raw_dir):
                t = self.window.apply(t)
                if t.rows:
                    yield t
            return
        if part not in self._whole:
            self._whole[part] = read_source(src, skip, self.raw_dir)
        whole = self.window.apply(self._whole[part])
        if sources is not None:
            sources.extend(whole.sources)
        for start in range(0, whole.rows, self.chunk_rows):
            piece = slice_table(whole, start, min(start + self.chunk_rows, whole.rows))
            piece.notes = whole.notes
            yield piece

    def _parts(self, sources: list[SourceFile] | None) -> Iterator[tuple[Table, int | None, int]]:
        """(table, presplit part code or None, the table's first row within its part)."""
        src = self.cfg.data.source
        if src.kind != "presplit":
            at = 0
            for t in self._tables_of(src, "all", sources):
                yield t, None, at
                at += t.rows
            return
        for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST)):
            spec = getattr(src, name)
            if spec is None:
                continue
            at = 0
            for t in self._tables_of(_inner_source(spec, f"data.source.{name}"), name, sources):
                yield t, code, at
                at += t.rows

    # ------------------------------------------------------------------------------------ splits
    def _split(self, t: Table, start: int, part: int | None, in_part: int) -> np.ndarray:
        sp, n = self.cfg.data.split, t.rows
        if part is not None:
            if part == S.TRAIN and self.cfg.data.source.val is None:  # carve val out of train
                at = np.arange(in_part, in_part + n, dtype=np.int64)
                return S.random_split_at(at, sp.val_fraction, 0.0, sp.seed)
            return np.full(n, part, dtype=np.int8)
        if self._assign is not None:
            return self._assign.assign(start, n)
        if sp.mode == "random":
            at = np.arange(start, start + n, dtype=np.int64)
            return S.random_split_at(at, sp.val_fraction, sp.test_fraction, sp.seed)
        if sp.mode == "by_day":
            assert t.day is not None
            out = np.full(n, S.TRAIN, dtype=np.int8)
            out[t.day == self._days - 1] = S.TEST
            out[t.day == self._days - 2] = S.VAL
            return out
        raise UserError(
            f"data.split.mode {sp.mode!r} does not fit data.source.kind {self.cfg.data.source.kind!r}"
        )

    def _leave_last_n(self) -> LastEvents:
        """Pass 0 of leave_last_n: every row's (user, timestamp) merged into its user's last 2n keys."""
        last, start, timed = LastEvents(self.cfg.data.split.n), 0, True
        for t, _, _ in self._parts(None):
            if t.user_feature is None:
                raise UserError("data.split.mode leave_last_n needs a user column (data.source.user)")
            timed &= t.timestamp is not None
            last.observe(t.sparse[t.sparse_names.index(t.user_feature)], t.timestamp, start)
            start += t.rows
        if not timed:
            log.warning("no timestamp column: leave_last_n uses file order as time order")
        return last

    def __iter__(self) -> Iterator[Chunk]:
        first = self._passes == 0
        self._passes += 1
        if (
            self._assign is None
            and self.cfg.data.source.kind != "presplit"
            and self.cfg.data.split.mode == "leave_last_n"
        ):
            self._assign = self._leave_last_n()
        self.window.reset()
        sources: list[SourceFile] | None = [] if first else None
        start = 0
        schema: tuple[list[str], list[str]] | None = None
        for t, part, in_part in self._parts(sources):
            if schema is None:
                schema = (t.sparse_names, t.dense_names)
            elif (t.sparse_names, t.dense_names) != schema:  # presplit parts of different layouts
                raise UserError(
                    f"sources disagree on columns: {schema[0] + schema[1]} vs {t.sparse_names + t.dense_names}"
                )
            yield Chunk(table=t, start=start, assign=self._split(t, start, part, in_part))
            start += t.rows
        self.window.check_not_empty()
        if sources is not None:
            self.sources, self.rows = sources, start

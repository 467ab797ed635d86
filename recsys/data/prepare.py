"""`recsys data prepare`: raw files → labels → split → vocabularies (fit on train) → MDS train/val/test.

Output (see recsys.data.metadata): train/ val/ test/ MDS block datasets, vocab/<feature>.txt,
metadata.json (written last, so a folder with metadata.json is complete).

Two passes over chunks of `data.chunk_rows` rows (recsys.data.chunks), so memory does not grow with
the row count: pass 1 decides each row's split and counts ids on train (vocab.IdCounter), keeping
each chunk encoded on disk (recsys.data.spill); pass 2 maps ids to embedding rows and writes the MDS
splits. Val and test keep source order; train rows are shuffled within windows of
`data.shuffle_window` source rows (splits.shuffle_keys of the split seed), so a block is a random
sample of its window rather than a run of one user or one hour, and the output is the same whatever
the chunk size (docs/data-at-scale.md). With data.negatives the sampled label-0 rows are drawn
between the passes from the spill, user bucket by user bucket (recsys.data.negative_buckets), and
pass 2 writes each right after its positive.

Side features joined by the readers (user age, item genre slots, …) are ordinary sparse features with
vocabularies fit on train like any other; metadata.json names which describe the user
(`user_side_features`) and which the item (`item_side_features`), and `read_notes` says what reading
changed (interactions without a side row, tokens beyond the slots).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.data import splits as S
from recsys.data import vocab as V
from recsys.data.chunks import ChunkReader
from recsys.data.hashing import TableMap
from recsys.data.history import (
    HistoryBuilder,
    finish_history,
    history_columns,
    new_history_builder,
    observe_chunk,
)
from recsys.data.lineage import Previous, owned_rows, window_info
from recsys.data.mds import SplitWriter
from recsys.data.memory import PhaseHook, tables_bytes
from recsys.data.metadata import SPLITS, Metadata, SparseFeature, SplitInfo, data_settings, write_metadata
from recsys.data.negative_buckets import NegativeSampler
from recsys.data.negatives import CONST_DENSE
from recsys.data.negatives import check_source as check_negatives
from recsys.data.readers import Table
from recsys.data.spill import ChunkSpill, SpilledChunk
from recsys.data.window import is_windowed
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config, LabelConfig

log = logging.getLogger(__name__)

OUTPUTS = ("metadata.json", "vocab", *SPLITS)

# Seconds per phase of the last prepare() in this process (read, vocab, write: wall; *_cpu: CPU-seconds
# of the process, all threads), for the benchmark.
LAST_TIMINGS: dict[str, float] = {}


def _say(msg: str) -> None:
    """Progress line on stderr (stdout stays for results)."""
    print(msg, file=sys.stderr, flush=True)


def _check_compression(name: str | None) -> None:
    if name is None:
        return
    from streaming.base.compression import get_compressions

    if name not in get_compressions():
        raise UserError(
            f"data.compression: unknown {name!r} (use zstd, zstd:1 … zstd:22, gz, snappy, or null)"
        )


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse to touch an existing prepared folder unless overwrite; with it, remove the old outputs."""
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not overwrite:
        raise UserError(
            f"{out}: already holds prepared data ({', '.join(existing)}); pass --overwrite to replace it"
        )
    for name in existing:
        p = out / name
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if overwrite and out.is_dir():  # pass 1's spill of a run that was killed (see recsys.data.spill)
        for stale in out.glob(".spill-*"):
            shutil.rmtree(stale, ignore_errors=True)


def binarize(label: np.ndarray | None, assign: np.ndarray, cfg: LabelConfig) -> tuple[np.ndarray, dict]:
    """Binary labels per data.label.mode; returns (float32 labels, the settings applied)."""
    if cfg.mode == "all_positive":
        return np.ones(len(assign), np.float32), {"mode": "all_positive"}
    if label is None:
        raise UserError(
            f"data.label.mode {cfg.mode!r} needs a label column; the source has none (use all_positive)"
        )
    if cfg.mode == "as_is":
        values = np.unique(label)
        if not np.isin(values, [0.0, 1.0]).all():
            raise UserError(
                f"data.label.mode as_is needs 0/1 labels, found values like {values[:5].tolist()}; "
                "use mode threshold or mean for ratings"
            )
        return label.astype(np.float32), {"mode": "as_is"}
    if cfg.mode == "threshold":
        thr = cfg.threshold
    else:  # mean over train only, so val/test do not leak into the cut
        train = label[assign == S.TRAIN]
        thr = float(train.mean()) if len(train) else float(label.mean())
    return (label >= thr).astype(np.float32), {"mode": cfg.mode, "threshold": thr}


def vocab_file(name: str) -> str:
    """Vocabulary file of a feature, relative to the prepared folder (unsafe characters become _)."""
    return f"vocab/{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.txt"


class _ExactSum:
    """An exact running sum of float64 values (as a Fraction), so a mean does not depend on chunking."""

    def __init__(self) -> None:
        self.total, self.count = Fraction(0), 0

    def add(self, values: np.ndarray) -> None:
        """Add the values (finite float64)."""
        mant, exp = np.frexp(np.asarray(values, dtype=np.float64))
        ints = (mant * float(1 << 53)).astype(np.int64)  # exact: value = ints * 2**(exp - 53)
        for e in np.unique(exp):
            group = ints[exp == e]
            # int64 sums of <= 512 values below 2**53 cannot overflow; Python ints take the rest.
            partial = sum(int(x) for x in np.add.reduceat(group, np.arange(0, len(group), 512)))
            self.total += Fraction(partial) * Fraction(2) ** (int(e) - 53)
        self.count += len(values)

    def mean(self) -> float:
        """The correctly rounded mean of every value added."""
        return float(self.total / self.count)


@dataclass
class _Counted:
    """What pass 1 learns: the schema (from the first chunk), id counts per feature, label statistics."""

    first: Table
    counters: list[V.IdCounter]
    notes: list[str]
    train_labels: _ExactSum
    all_labels: _ExactSum
    train_end: int = 0  # one past the position of the last train row: pass 2 flushes its window there


def _count(
    reader: ChunkReader,
    cfg: Config,
    pool: ThreadPoolExecutor,
    spill: ChunkSpill,
    history: HistoryBuilder | None = None,
) -> _Counted:
    """Pass 1: every chunk's split, its train ids counted per feature, label checks and statistics;
    the chunk goes to `spill` encoded, for pass 2 (and its users/items/times to `history`)."""
    from tqdm import tqdm

    done: _Counted | None = None
    bar = tqdm(unit="rows", desc="pass 1: count ids", disable=None, mininterval=0.5)
    for chunk in reader:
        t = chunk.table
        if done is None:
            counters = [V.IdCounter() for _ in t.sparse]
            done = _Counted(t, counters, [], _ExactSum(), _ExactSum())
        train = chunk.assign == S.TRAIN
        if train.any():
            done.train_end = chunk.start + len(train) - int(np.argmax(train[::-1]))
        encoded = list(pool.map(V.IdCounter.add, done.counters, t.sparse, [train] * len(t.sparse)))
        done.notes.extend(n for n in t.notes if n not in done.notes)
        if t.label is not None:
            if cfg.data.label.mode == "as_is":
                binarize(t.label, chunk.assign, cfg.data.label)  # raises on non-0/1 labels, here in pass 1
            elif cfg.data.label.mode == "mean":
                done.train_labels.add(t.label[train])
                done.all_labels.add(t.label)
        spill.write(SpilledChunk(chunk.start, chunk.assign, t.label, t.dense, encoded))
        if history is not None:
            observe_chunk(history, t, chunk.assign)
        bar.update(t.rows)
    bar.close()
    if done is None:
        raise UserError(f"data.source: no rows read ({cfg.data.source.kind})")
    return done


def _label_rule(counted: _Counted, cfg: Config) -> tuple[LabelConfig, dict]:
    """The label settings pass 2 applies to every chunk, and what metadata.json records of them."""
    lab = cfg.data.label
    if lab.mode != "mean" or counted.first.label is None:
        return lab, {}
    stats = counted.train_labels if counted.train_labels.count else counted.all_labels
    thr = stats.mean()  # over train only, so val/test do not leak into the cut
    return lab.model_copy(update={"mode": "threshold", "threshold": thr}), {"mode": "mean", "threshold": thr}


class _TrainWindow:
    """Train rows of one shuffle window (data.shuffle_window source rows), written shuffled when full."""

    def __init__(self, writer: SplitWriter, window: int, seed: int) -> None:
        self.writer, self.window, self.seed = writer, window, seed
        self.current = -1
        self.parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(
        self,
        pos: np.ndarray,
        label: np.ndarray,
        dense: np.ndarray,
        sparse: np.ndarray,
        keys: np.ndarray | None = None,
    ) -> None:
        """Buffer train rows at source positions `pos` (ascending); earlier windows are written first.
        Their shuffle keys are splits.shuffle_keys of the positions unless given (sampled negatives)."""
        keys = S.shuffle_keys(self.seed, pos) if keys is None else keys
        win = pos // self.window
        if len(win) and win[0] == win[-1] == self.current:  # the common case: no copy by mask
            self.parts.append((keys, label, dense, sparse))
            return
        for w in np.unique(win):
            if w != self.current:
                self.flush()
                self.current = int(w)
            m = win == w
            self.parts.append((keys[m], label[m], dense[m], sparse[m]))

    def flush(self) -> None:
        """Write the buffered window ordered by shuffle key."""
        if not self.parts:
            return
        keys, label, dense, sparse = (np.concatenate(c) for c in zip(*self.parts, strict=True))
        self.parts = []
        order = np.argsort(keys, kind="stable")
        step = 1 << 16  # gathered piece by piece: no second copy of the whole window
        for at in range(0, len(order), step):
            o = order[at : at + step]
            self.writer.write(label[o], dense[o], sparse[o])


def _mapped(
    maps: list[TableMap], encoded: list[V.Encoded], rows: int, dtype: type, pool: ThreadPoolExecutor
) -> np.ndarray:
    """A chunk's values of every sparse feature as one [rows, S] array; each worker fills its feature's
    row of a [S, rows] array in place, transposed once at the end: filling columns of the [rows, S]
    array directly wrote every cache line of it once per feature."""
    out = np.empty((len(maps), rows), dtype)

    def fill(j: int) -> None:
        out[j] = maps[j].rows_encoded(encoded[j])

    list(pool.map(fill, range(len(maps))))
    return np.ascontiguousarray(out.T)


def _write(
    spill: ChunkSpill,
    rows: int,
    maps: list[TableMap],
    rule: LabelConfig,
    out: Path,
    cfg: Config,
    pool: ThreadPoolExecutor,
    facts: _FactRows | None,
    history: HistoryBuilder | None = None,
    negatives: NegativeSampler | None = None,
    train_end: int = 0,
) -> dict[str, SplitInfo]:
    """Pass 2: map every spilled chunk's ids to rows and route its rows to the split writers
    (with `negatives`, each positive followed by its sampled rows); the train rows buffered for the
    shuffle are written once the chunks pass `train_end` (pass 1's last train row) or at the end."""
    from tqdm import tqdm

    d = cfg.data
    bar = tqdm(total=rows, unit="rows", desc="pass 2: write MDS", disable=None, mininterval=0.5)
    hl = d.history.length if d.history is not None else None
    writers = {
        name: SplitWriter(out / name, d.block_size, d.compression, d.shard_size_limit, history_length=hl)
        for name in SPLITS
    }
    train = _TrainWindow(writers["train"], d.shuffle_window, d.split.seed)
    # Rows are int32 while buffered (half the train window's memory); the MDS blocks hold int64.
    narrow = all(m.max_value < 2**31 - 1 for m in maps)
    dtype = np.int32 if narrow else np.int64
    for chunk in spill:
        labels = binarize(chunk.label, chunk.assign, rule)[0]
        sparse = _mapped(maps, chunk.encoded, chunk.rows, dtype, pool)
        if history is not None:  # history columns ride behind the sparse ones (SplitWriter splits them)
            sparse = np.concatenate([sparse, *history_columns(history, chunk.start, chunk.rows)], axis=1)
        if facts is not None:
            facts.add(chunk.start, chunk.assign, labels)
        assign, dense, keys = chunk.assign, chunk.dense, None
        positions = np.arange(chunk.start, chunk.start + chunk.rows, dtype=np.int64)
        if negatives is not None:
            assign, labels, dense, sparse, positions, keys = negatives.extend(
                chunk.start, assign, labels, dense, sparse
            )
        for name, code in (("val", S.VAL), ("test", S.TEST)):
            m = assign == code
            writers[name].write(labels[m], dense[m], sparse[m])
        m = assign == S.TRAIN
        train.add(positions[m], labels[m], dense[m], sparse[m], None if keys is None else keys[m])
        if chunk.start + chunk.rows >= train_end:  # no train rows follow: written now, not in pass 2's tail
            train.flush()
        bar.update(chunk.rows)
    train.flush()
    for w in writers.values():
        w.close()
    bar.close()
    return {
        name: SplitInfo(rows=w.rows, blocks=w.blocks, positives=int(w.positives))
        for name, w in writers.items()
    }


def _save_vocabularies(
    out: Path,
    names: list[str],
    counters: list[V.IdCounter],
    cfg: Config,
    previous: Previous | None = None,
    held: list[int] | None = None,
) -> tuple[list[SparseFeature], list[TableMap], dict[str, tuple[int, int]]]:
    """Fix each feature's table from its train counts (exact, capped or managed-collision: model.tables)
    and write vocab/<feature>.txt; returns the metadata entries, the id → value maps of pass 2 and,
    growing `previous`'s vocabularies, the rows (inherited, added) per feature. With `held`, appends
    the vocabulary state's bytes after each table (counters not yet fixed + tables fixed)."""
    (out / "vocab").mkdir(exist_ok=True)
    specs = table_specs(cfg, names)
    features, maps, grown = [], [], {}
    for name, counter in zip(names, counters, strict=True):
        before = previous.ids(name) if previous else None
        table = TableMap(counter, cfg.data.min_count, specs.get(name), before)
        V.save_ids(out / vocab_file(name), table.ids)
        features.append(_sparse_feature(name, table))
        maps.append(table)
        if held is not None:
            held.append(tables_bytes(counters, maps))
        if before is not None:
            owned = owned_rows(features[-1], table.ids)
            grown[name] = (len(before), owned - len(before))
    return features, maps, grown


def table_specs(cfg: Config, names: list[str]) -> dict[str, Any]:
    """Feature → TableConfig of every non-exact table; an unknown name in model.tables is an error."""
    unknown = sorted(set(cfg.model.tables) - set(names))
    if unknown:
        raise UserError(
            f"model.tables.{unknown[0]}: no sparse feature {unknown[0]!r} in the data (features: {names})"
        )
    specs = {name: cfg.model.table(name) for name in names}
    return {name: spec for name, spec in specs.items() if spec.kind != "exact"}


def _sparse_feature(name: str, table: TableMap) -> SparseFeature:
    """The metadata entry of one fitted feature (see recsys.data.hashing.TableMap)."""
    from recsys.data.hashing import HASH_NAME

    extra: dict[str, Any] = {}
    if table.kind != "exact":
        extra = {"table": table.kind, "id_hash": HASH_NAME, "hashed_rows": table.hashed_rows}
        if table.collisions is not None:
            extra["collisions"] = table.collisions
    return SparseFeature(name=name, num_embeddings=table.num_embeddings, vocab_file=vocab_file(name), **extra)


def prepare(cfg: Config, overwrite: bool, on_phase: PhaseHook | None = None) -> Metadata:
    """Prepare cfg.data.source into cfg.data.prepared_dir in two streaming passes; returns the metadata.

    `on_phase(phase, vocab_bytes)` is called as pass 1, the vocabularies and pass 2 end (the benchmark
    reads peak RSS there; recsys.data.memory says what vocab_bytes counts)."""
    phase_end = on_phase or (lambda phase, vocab_bytes: None)
    from recsys.data.synth import SYNTH_JSON, raw_dir_of, raw_files, synthesize

    out = Path(cfg.data.prepared_dir)
    if cfg.data.candidates.top_n:
        raise UserError(
            f"config {cfg.name}: data.candidates is set; its rows come from a retriever: "
            "recsys data candidates --config … --run-id TWO_TOWER_RUN"
        )
    _check_compression(cfg.data.compression)
    previous = Previous.open(cfg)  # before check_output: never overwrite the folder a window grows from
    check_output(out, overwrite)
    src = cfg.data.source
    synthetic = src.kind in ("synthetic_ctr", "synthetic_interactions")
    if synthetic:
        files = raw_files(src, raw_dir_of(cfg))
        present = [f.exists() for f in files]
        if not any(present):
            synthesize(cfg, overwrite=False)
        elif not all(present):
            missing = files[present.index(False)]
            raise UserError(f"{missing}: raw file missing; run `recsys data synth --overwrite` to regenerate")

    t0, c0 = time.perf_counter(), time.process_time()
    _say(f"prepare {cfg.name}: pass 1 over the {src.kind} source (split, count ids on train) …")
    check_negatives(cfg)
    reader = ChunkReader(cfg)
    out.mkdir(parents=True, exist_ok=True)
    spill = ChunkSpill(out)
    # Features are independent; Arrow's hashing and numpy release the GIL.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        try:
            history = new_history_builder(cfg)
            counted = _count(reader, cfg, pool, spill, history)
            t_read, c_read = time.perf_counter(), time.process_time()
            phase_end("pass 1", tables_bytes(counted.counters))  # counters only grow: largest now
            first = counted.first
            _say(
                f"read {reader.rows:,} rows in {t_read - t0:.1f}s; fixing {len(first.sparse)} vocabularies …"
            )
            if previous is not None:
                previous.check_schema(
                    first.sparse_names, first.dense_names, cfg, table_specs(cfg, first.sparse_names)
                )
            negatives = None
            if cfg.data.negatives.per_positive:  # the catalogue, before the vocabularies fix the counters
                negatives = NegativeSampler.start(cfg, first, counted.counters, spill, reader.rows)
            held = [tables_bytes(counted.counters)]
            features, maps, grown = _save_vocabularies(
                out, first.sparse_names, counted.counters, cfg, previous, held
            )
            if history is not None:
                finish_history(history, maps[first.sparse_names.index(first.item_feature or "")])
            rule, label_info = _label_rule(counted, cfg)
            label_info = label_info or binarize(first.label, np.zeros(0, np.int8), rule)[1]
            if negatives is not None:
                _say(f"sampling negatives in {negatives.buckets} user buckets …")
                negatives.sample(spill, maps, lambda c: binarize(c.label, c.assign, rule)[0])
                counted.notes.append(negatives.note)
            t_vocab, c_vocab = time.perf_counter(), time.process_time()
            facts = _FactRows.open(raw_dir_of(cfg) / SYNTH_JSON, reader.rows) if synthetic else None
            phase_end("vocabularies", max(held))
            infos = _write(
                spill, reader.rows, maps, rule, out, cfg, pool, facts, history, negatives, counted.train_end
            )
        finally:
            spill.close()
    t_write, c_write = time.perf_counter(), time.process_time()
    phase_end("pass 2", tables_bytes(counted.counters, maps))  # fixed tables: the same all pass 2

    LAST_TIMINGS.update(read=t_read - t0, vocab=t_vocab - t_read, write=t_write - t_vocab)
    LAST_TIMINGS.update(read_cpu=c_read - c0, vocab_cpu=c_vocab - c_read, write_cpu=c_write - c_vocab)
    meta = Metadata(
        name=cfg.name,
        kind=first.kind,
        block_size=cfg.data.block_size,
        dense_features=first.dense_names or ([CONST_DENSE] if cfg.data.negatives.per_positive else []),
        sparse_features=features,
        user_feature=first.user_feature,
        item_feature=first.item_feature,
        user_side_features=first.user_side,
        item_side_features=first.item_side,
        read_notes=counted.notes,
        splits=infos,
        sources=reader.sources,
        label=label_info,
        synthetic=facts.result() if facts is not None else None,
        settings=data_settings(cfg),
        window=window_info(reader.window.record(), previous, grown)
        if previous is not None or is_windowed(cfg)
        else None,
        lineage=previous.lineage() if previous is not None else [],
        history_length=cfg.data.history.length if cfg.data.history is not None else None,
    )
    write_metadata(out, meta)
    bad = sum(s.bad_rows.count for s in meta.sources)
    print(
        f"prepared {out}: "
        + ", ".join(f"{k} {v.rows} rows/{v.blocks} blocks" for k, v in infos.items())
        + f"; {len(features)} sparse, {len(meta.dense_features)} dense features"
        + (f"; {bad} bad rows skipped" if bad else "")
        + (f"; {len(meta.read_notes)} read notes in metadata.json" if meta.read_notes else "")
        + f" (pass 1 {t_read - t0:.1f}s, vocab {t_vocab - t_read:.1f}s, pass 2 {t_write - t_vocab:.1f}s)"
    )
    return meta


class _FactRows:
    """synth.json facts, plus the Bayes-optimal AUC of exactly the rows in each split (synthetic CTR).

    Pass 2 gathers each split's true probabilities and labels (12 bytes a row: synthetic data only,
    which is generated at a size that fits); true_ctr.npy is memory-mapped, not loaded.
    """

    def __init__(self, facts: dict, p: np.ndarray | None) -> None:
        self.facts, self.p = facts, p
        self.parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {S.TRAIN: [], S.VAL: [], S.TEST: []}

    @classmethod
    def open(cls, path: Path, rows: int) -> _FactRows | None:
        """The facts of synth.json at `path` (None when there is none) for a source of `rows` rows."""
        from recsys.data.synth import TRUE_CTR

        if not path.is_file():
            return None
        facts = json.loads(path.read_text())
        p_file = path.parent / TRUE_CTR
        p = None
        if facts.get("kind") == "synthetic_ctr" and p_file.is_file():
            facts["bayes_auc_all_rows"] = facts.pop("bayes_auc", None)
            p = np.load(p_file, mmap_mode="r")
            if len(p) != rows:  # skipped bad rows would misalign the true probabilities
                p = None
        return cls(facts, p)

    def add(self, start: int, assign: np.ndarray, labels: np.ndarray) -> None:
        """Keep the true probability and label of rows start.. (split `assign`), by split."""
        if self.p is None:
            return
        p = np.asarray(self.p[start : start + len(assign)])
        for code, rows in self.parts.items():
            m = assign == code
            rows.append((p[m], labels[m]))

    def result(self) -> dict:
        """The facts, with bayes_auc_by_split and bayes_auc (test) when the probabilities lined up."""
        from recsys.data.synth import auc

        if self.p is None:
            return self.facts
        by_split = {}
        for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST)):
            parts = self.parts[code]
            p = np.concatenate([x[0] for x in parts]) if parts else np.zeros(0)
            lab = np.concatenate([x[1] for x in parts]) if parts else np.zeros(0, np.float32)
            by_split[name] = auc(p, lab)
        self.facts["bayes_auc_by_split"] = by_split
        self.facts["bayes_auc"] = by_split["test"]
        return self.facts

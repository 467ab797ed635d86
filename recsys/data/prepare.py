"""`recsys data prepare`: raw files → labels → split → vocabularies (fit on train) → MDS train/val/test.

Output (see recsys.data.metadata): train/ val/ test/ MDS block datasets, vocab/<feature>.txt,
metadata.json (written last, so a folder with metadata.json is complete). Train rows are shuffled
with the split seed before blocking, so a block is a random sample of train rather than a run of
one user or one hour; val and test keep source order.

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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.data import splits as S
from recsys.data import vocab as V
from recsys.data.metadata import SPLITS, Metadata, SparseFeature, SplitInfo, data_settings, write_metadata
from recsys.data.negatives import add_negatives
from recsys.data.readers import Table, concat_tables, read_source
from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config, LabelConfig

log = logging.getLogger(__name__)

OUTPUTS = ("metadata.json", "vocab", *SPLITS)

# Seconds per phase of the last prepare() in this process (read, vocab, write), for the benchmark.
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


def read_with_split(cfg: Config) -> tuple[Table, np.ndarray]:
    """Read the configured source and assign each row to train (0), val (1) or test (2)."""
    from recsys.data.synth import raw_dir_of

    src, sp = cfg.data.source, cfg.data.split
    skip = cfg.data.skip_bad_rows
    if src.kind == "presplit":
        parts = {"train": src.train, "val": src.val, "test": src.test}
        tables, assign = [], []
        for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST)):
            if parts[name] is None:
                continue
            t = read_source(_inner_source(parts[name], f"data.source.{name}"), skip)
            tables.append(t)
            a = np.full(t.rows, code, dtype=np.int8)
            if name == "train" and src.val is None:  # carve val out of train
                a = S.random_split(t.rows, sp.val_fraction, 0.0, sp.seed)
            assign.append(a)
        return concat_tables(tables), np.concatenate(assign)
    table = read_source(src, skip, raw_dir_of(cfg))
    if sp.mode == "random":
        return table, S.random_split(table.rows, sp.val_fraction, sp.test_fraction, sp.seed)
    if sp.mode == "by_day":
        if table.day is None:
            raise UserError(
                "data.split.mode by_day needs day files (data.source.kind criteo or synthetic_ctr)"
            )
        return table, S.by_day(table.day)
    if sp.mode == "leave_last_n":
        if table.user_feature is None:
            raise UserError("data.split.mode leave_last_n needs a user column (data.source.user)")
        if table.timestamp is None:
            log.warning("no timestamp column: leave_last_n uses file order as time order")
        users, _ = V.encode(table.sparse[table.sparse_names.index(table.user_feature)])
        return table, S.leave_last_n(users, table.timestamp, sp.n)
    raise UserError(f"data.split.mode {sp.mode!r} does not fit data.source.kind {src.kind!r}")


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


def split_order(assign: np.ndarray, seed: int) -> tuple[np.ndarray, dict[str, slice]]:
    """Row order of the output: train rows shuffled with the split seed, then val, then test rows in
    source order; returns the order and each split's slice of it."""
    rng = np.random.default_rng(seed + 1)
    parts, bounds, start = [], {}, 0
    for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST)):
        idx = np.flatnonzero(assign == code)
        if name == "train":
            idx = rng.permutation(idx)
        parts.append(idx)
        bounds[name] = slice(start, start + len(idx))
        start += len(idx)
    return np.concatenate(parts), bounds


def _write_splits(
    out: Path,
    label: np.ndarray,
    dense: np.ndarray,
    sparse: np.ndarray,
    order: np.ndarray,
    bounds: dict[str, slice],
    cfg: Config,
    alongside: Callable[[], None] | None = None,
) -> dict[str, SplitInfo]:
    """Write the three MDS splits; returns their counts.

    `label` and `dense` are in source order, `sparse` already in output order (see split_order).
    `alongside` runs in this thread while the splits are written (small work that overlaps).
    """
    from tqdm import tqdm

    from recsys.data.mds import write_split

    infos: dict[str, SplitInfo] = {}
    bar = tqdm(total=len(label), unit="rows", desc="write MDS", disable=None, mininterval=0.5)

    def one(name: str) -> SplitInfo:
        sl = bounds[name]
        idx = order[sl]
        lab = np.take(label, idx)
        blocks = write_split(
            out / name,
            lab,
            np.take(dense, idx, axis=0),
            sparse[sl],
            cfg.data.block_size,
            cfg.data.compression,
            cfg.data.shard_size_limit,
            on_block=bar.update,
        )
        return SplitInfo(rows=len(idx), blocks=blocks, positives=int(lab.sum()))

    # Splits are written concurrently: zstd, numpy's copies and the file writes release the GIL.
    with ThreadPoolExecutor(max_workers=min(3, os.cpu_count() or 1)) as pool:
        futures = {name: pool.submit(one, name) for name in SPLITS}
        if alongside is not None:
            alongside()
        for name, fut in futures.items():
            infos[name] = fut.result()
    bar.close()
    return infos


def map_vocabularies(
    table: Table,
    train: np.ndarray,
    min_count: int,
    order: np.ndarray | None = None,
    tables: dict[str, Any] | None = None,
) -> tuple[np.ndarray, list[V.Vocab]]:
    """Fit each sparse feature's vocabulary on train rows and map every row (int64 [n, S]).

    With `order`, row i of the result is source row order[i]. The result is a column-major view
    (one contiguous column per feature), which is how the features are computed. `tables` (feature →
    TableConfig, see recsys.data.hashing) makes a feature capped or managed-collision; the fits are
    kept in LAST_FITS for the metadata.
    """
    from recsys.data.hashing import fit_table

    n, num = table.rows, len(table.sparse)
    sparse_t = np.empty((num, n), dtype=np.int64)
    specs = tables or {}

    def one(j: int) -> Any:
        enc = V.encode_column(table.sparse[j])
        fit = fit_table(enc, train, min_count, specs.get(table.sparse_names[j]))
        codes = enc.codes if order is None else enc.codes[order]
        np.take(fit.lookup, codes, out=sparse_t[j])
        return fit

    # Columns are independent; Arrow's hashing and numpy's gathers release the GIL.
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        fits = list(pool.map(one, range(num)))
    LAST_FITS[:] = fits
    return sparse_t.T, [f.vocab for f in fits]


# The TableFit of each feature from the last map_vocabularies() in this process (kinds, collisions).
LAST_FITS: list[Any] = []


def table_specs(cfg: Config, names: list[str]) -> dict[str, Any]:
    """Feature → TableConfig of every non-exact table; an unknown name in model.tables is an error."""
    unknown = sorted(set(cfg.model.tables) - set(names))
    if unknown:
        raise UserError(
            f"model.tables.{unknown[0]}: no sparse feature {unknown[0]!r} in the data (features: {names})"
        )
    specs = {name: cfg.model.table(name) for name in names}
    return {name: spec for name, spec in specs.items() if spec.kind != "exact"}


def _sparse_feature(name: str, fit: Any) -> SparseFeature:
    """The metadata entry of one fitted feature (see recsys.data.hashing.TableFit)."""
    from recsys.data.hashing import HASH_NAME

    extra: dict[str, Any] = {}
    if fit.kind != "exact":
        extra = {"table": fit.kind, "id_hash": HASH_NAME, "hashed_rows": fit.hashed_rows}
        if fit.collisions is not None:
            extra["collisions"] = fit.collisions
    return SparseFeature(name=name, num_embeddings=fit.num_embeddings, vocab_file=vocab_file(name), **extra)


def prepare(cfg: Config, overwrite: bool) -> Metadata:
    """Prepare cfg.data.source into cfg.data.prepared_dir; returns the metadata written."""
    from recsys.data.synth import SYNTH_JSON, raw_dir_of, raw_files, synthesize

    out = Path(cfg.data.prepared_dir)
    _check_compression(cfg.data.compression)
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

    t0 = time.perf_counter()
    _say(f"prepare {cfg.name}: reading {src.kind} source …")
    table, assign = read_with_split(cfg)
    t_read = time.perf_counter()
    _say(
        f"read {table.rows:,} rows in {t_read - t0:.1f}s; fitting {len(table.sparse)} vocabularies on train …"
    )
    labels, label_info = binarize(table.label, assign, cfg.data.label)
    table, assign, labels = add_negatives(table, assign, labels, cfg.data.negatives)
    order, bounds = split_order(assign, cfg.data.split.seed)
    specs = table_specs(cfg, table.sparse_names)
    sparse, vocabs = map_vocabularies(table, assign == S.TRAIN, cfg.data.min_count, order, specs)
    fits = list(LAST_FITS)
    t_vocab = time.perf_counter()

    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab").mkdir(exist_ok=True)
    features = []
    synth_facts: dict | None = None

    def alongside() -> None:
        nonlocal synth_facts
        for name, vocab, fit in zip(table.sparse_names, vocabs, fits, strict=True):
            vocab.save(out / vocab_file(name))
            features.append(_sparse_feature(name, fit))
        if synthetic:
            synth_facts = _synthetic_facts(raw_dir_of(cfg) / SYNTH_JSON, table, labels, assign)

    infos = _write_splits(out, labels, table.dense, sparse, order, bounds, cfg, alongside)
    t_write = time.perf_counter()

    LAST_TIMINGS.update(read=t_read - t0, vocab=t_vocab - t_read, write=t_write - t_vocab)
    meta = Metadata(
        name=cfg.name,
        kind=table.kind,
        block_size=cfg.data.block_size,
        dense_features=table.dense_names,
        sparse_features=features,
        user_feature=table.user_feature,
        item_feature=table.item_feature,
        user_side_features=table.user_side,
        item_side_features=table.item_side,
        read_notes=table.notes,
        splits=infos,
        sources=table.sources,
        label=label_info,
        synthetic=synth_facts,
        settings=data_settings(cfg),
    )
    write_metadata(out, meta)
    bad = sum(s.bad_rows.count for s in meta.sources)
    print(
        f"prepared {out}: "
        + ", ".join(f"{k} {v.rows} rows/{v.blocks} blocks" for k, v in infos.items())
        + f"; {len(features)} sparse, {len(table.dense_names)} dense features"
        + (f"; {bad} bad rows skipped" if bad else "")
        + (f"; {len(meta.read_notes)} read notes in metadata.json" if meta.read_notes else "")
        + f" (read {t_read - t0:.1f}s, vocab {t_vocab - t_read:.1f}s, write {t_write - t_vocab:.1f}s)"
    )
    return meta


def _synthetic_facts(path: Path, table: Table, labels: np.ndarray, assign: np.ndarray) -> dict | None:
    """synth.json facts, plus the Bayes-optimal AUC of exactly the rows in each split (CTR)."""
    from recsys.data.synth import TRUE_CTR, auc

    if not path.is_file():
        return None
    facts = json.loads(path.read_text())
    p_file = path.parent / TRUE_CTR
    if facts.get("kind") == "synthetic_ctr" and p_file.is_file():
        p = np.load(p_file)
        facts["bayes_auc_all_rows"] = facts.pop("bayes_auc", None)
        if len(p) == table.rows:  # skipped bad rows would misalign the true probabilities
            by_split = {
                name: auc(p[assign == code], labels[assign == code])
                for name, code in (("train", S.TRAIN), ("val", S.VAL), ("test", S.TEST))
            }
            facts["bayes_auc_by_split"] = by_split
            facts["bayes_auc"] = by_split["test"]
    return facts

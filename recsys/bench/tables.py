"""`recsys bench tables`: collision rate and AUC of exact, capped and managed-collision tables, printed.

One synthetic CTR data set with a Bayes AUC (dlrm_synth's generator at a larger cardinality, so caps
bite; every feature has `cardinality` values with Zipf popularity), prepared once per table setting
from the same raw files, and the same DLRM trained on each through `recsys.train.train`:

- exact: one row per train id;
- capped P%: max_rows = P% of the exact table's rows; the most frequent ids keep rows, the rest
  share `hashed_rows` (default a tenth of max_rows) hashed rows; "all hashed" puts every id into
  hashed rows (hashed_rows = max_rows - 1), which is what MLPerf's DLRM does with `% max_rows`;
- managed collision P%: TorchRec's MCH remapper with a table of P% of the exact table's rows.

Printed per setting: rows per table; the share of distinct train ids, and of train values (row
occurrences of ids), whose row is shared with another id (capped: hashed rows holding ≥ 2 train ids;
managed collision: ids that hold no row at the end of training and so share the miss row); val and
test AUC beside the Bayes AUC of the same rows. Figures, never assertions.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any

import numpy as np

BENCH_DIR = Path(".bench/tables")


def _settings(vocab_rows: int) -> list[tuple[str, list[str]]]:
    """(label, --set overrides of model.table_default) of each setting compared with exact."""
    out: list[tuple[str, list[str]]] = []
    for pct in (50, 10, 1):
        rows = max(3, round(vocab_rows * pct / 100))
        out.append(
            (f"capped {pct}%", ["model.table_default.kind=capped", f"model.table_default.max_rows={rows}"])
        )
    rows10 = max(3, round(vocab_rows * 0.10))
    out.append(
        (
            "capped 10%, all hashed",
            [
                "model.table_default.kind=capped",
                f"model.table_default.max_rows={rows10}",
                f"model.table_default.hashed_rows={rows10 - 1}",
            ],
        )
    )
    for pct in (50, 10):
        rows = max(3, round(vocab_rows * pct / 100))
        out.append(
            (
                f"managed collision {pct}%",
                ["model.table_default.kind=managed_collision", f"model.table_default.max_rows={rows}"],
            )
        )
    return out


def _capped_collisions(meta: Any) -> tuple[float, float]:
    """(share of train ids, share of train values) in shared rows, over every feature (metadata facts)."""
    keys = ("train_ids_in_shared_rows", "train_ids", "train_values_in_shared_rows", "train_values")
    tot = dict.fromkeys(keys, 0)
    for f in meta.sparse_features:
        for k in keys:
            tot[k] += (f.collisions or {}).get(k, 0)
    return tot[keys[0]] / max(tot[keys[1]], 1), tot[keys[2]] / max(tot[keys[3]], 1)


def _mc_collisions(cfg: Any, meta: Any, uri: str, run_id: str) -> tuple[float, float]:
    """The same shares for managed-collision tables: train ids holding no row at the end of training."""
    import mlflow
    import pyarrow.parquet as pq

    from recsys.data.hashing import id_hashes
    from recsys.data.loader import read_split_arrays

    client = mlflow.MlflowClient(uri)
    train = read_split_arrays(cfg.data.prepared_dir, "train", meta)["sparse"]
    ids = shared_ids = values = shared_values = 0
    tmp = Path(cfg.data.prepared_dir) / "exported"
    tmp.mkdir(exist_ok=True)
    for j, f in enumerate(meta.sparse_features):
        path = client.download_artifacts(run_id, f"embeddings/{f.name}.parquet", str(tmp))
        t = pq.read_table(path, columns=["id", "shared"]).to_pydict()
        hashes = id_hashes(t["id"])
        shared = np.array(t["shared"])
        uniq, counts = np.unique(train[:, j][train[:, j] != 0], return_counts=True)
        count_of = dict(zip(uniq.tolist(), counts.tolist(), strict=True))
        per_id = np.array([count_of.get(h, 0) for h in hashes.tolist()])
        ids += len(hashes)
        shared_ids += int(shared.sum())
        values += int(per_id.sum())
        shared_values += int(per_id[shared].sum())
    return shared_ids / max(ids, 1), shared_values / max(values, 1)


def _run(label: str, sets: list[str], base: list[str], root: Path, uri: str) -> tuple[str, int]:
    """Prepare and train one setting; returns its printed line and its tables' rows."""
    from recsys.config import load_config
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.train import train

    slug = label.replace(" ", "-").replace("%", "pct").replace(",", "")
    cfg = load_config("dlrm_synth", [*base, f"data.prepared_dir={root / slug}", *sets])
    # Prepare's and training's own lines (plans, metric tables) go to stderr: the console shows them,
    # and stdout — what `--record` keeps for the docs — holds the figures only.
    with contextlib.redirect_stdout(sys.stderr):
        prepare(cfg, overwrite=True)
        res = train(cfg, resume="never")
    meta = read_metadata(cfg.data.prepared_dir)
    if "managed" in label and res.run_id is not None:
        ids, vals = _mc_collisions(cfg, meta, uri, res.run_id)
    else:
        ids, vals = _capped_collisions(meta)
    bayes = (meta.synthetic or {}).get("bayes_auc_by_split") or {}
    val_auc = res.validations[-1]["auc"] if res.validations else float("nan")
    rows = max(f.num_embeddings for f in meta.sparse_features)
    line = (
        f"{label:<26} {rows:>7} {ids:>9.1%} {vals:>10.1%} {val_auc:>8.4f} {bayes.get('val', float('nan')):>8.4f} "
        f"{res.metrics['auc']:>8.4f} {bayes.get('test', float('nan')):>8.4f}"
    )
    return line, rows


def bench_tables(rows: int = 600_000, cardinality: int = 1000, epochs: int = 2) -> None:
    """Train the DLRM with every table setting on one synthetic CTR data set; print the figures."""
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    root = BENCH_DIR.resolve()
    uri = f"sqlite:///{root / 'mlflow.db'}"
    base = [
        f"data.source.rows={rows}",
        f"data.source.cardinality={cardinality}",
        "data.source.num_sparse=8",
        f"data.raw_dir={root / f'raw-{rows}-{cardinality}'}",
        f"train.epochs={epochs}",
        f"train.checkpoint.dir={root / 'ckpt'}",
        f"tracking.uri={uri}",
        "tracking.experiment=bench-tables",
    ]
    exact, vocab_rows = _run("exact", [], base, root, uri)
    lines = [exact] + [_run(label, sets, base, root, uri)[0] for label, sets in _settings(vocab_rows)]
    print(
        f"\nbench tables: synthetic CTR, {rows:,} rows (3 days: train/val/test), 8 sparse features × "
        f"{cardinality} values (Zipf), exact tables ≤ {vocab_rows} rows; DLRM of dlrm_synth, {epochs} epochs"
    )
    print(
        f"{'table setting (8 features)':<26} {'rows':>7} {'ids shr':>9} {'values shr':>10} {'val AUC':>8} "
        f"{'Bayes':>8} {'test AUC':>8} {'Bayes':>8}"
    )
    print("\n".join(lines))
    print(
        "ids shr / values shr: share of distinct train ids / of train values whose row another id also "
        "uses (capped: hashed rows with >= 2 train ids; managed collision: ids holding no row at the end)"
    )

"""Score a logged run on a prepared data window it did not train on.

A run's model knows the vocabulary it was trained with (logged as `vocab/` and `data/metadata.json`);
the window was prepared later with its own, larger vocabulary. The window's rows are mapped onto the
run's rows by raw id (`recsys.data.vocab.row_mapping`: ids the run never saw land in its OOV row), and
the run is then scored with the project's evaluation protocol: for a Two-Tower, Recall/NDCG/HitRate@K
of the window's `promotion.split` with each user's items in the window's train split excluded
(`recsys.evaluate.evaluate_retrieval`); for a DLRM, AUC / log loss of that split. Both models of a
gate are scored on the same rows the same way, so their figures compare.

The window's splits are read whole (as `recsys evaluate` does): one window is bounded by its time span.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.metadata import Metadata


@dataclass
class LoggedRun:
    """A training run as logged to MLflow: id, config, data metadata and the folder holding its vocab/."""

    run_id: str
    cfg: Config
    meta: Metadata
    vocab_root: Path  # holds vocab/<feature>.txt, the files meta's vocab_file names


@dataclass
class Window:
    """A prepared window folder: path, metadata and its splits' arrays (read once)."""

    path: Path
    meta: Metadata
    arrays: dict[str, dict[str, np.ndarray]]


def open_logged_run(run_id: str, tracking_uri: str, dst: Path) -> LoggedRun:
    """Download a run's resolved config, data metadata and vocabularies into `dst`."""
    from recsys.config import load_config
    from recsys.data.metadata import Metadata
    from recsys.retrieval.runs import CONFIG_ARTIFACT, _get_run, download, has_artifact

    _get_run(run_id, tracking_uri)  # an unknown run is one line naming it
    got = {}
    for path in (CONFIG_ARTIFACT, "data/metadata.json", "vocab"):
        if not has_artifact(run_id, tracking_uri, path):
            raise UserError(
                f"run {run_id} has no {path} artifact: promotion needs a run logged by `recsys train` "
                "(config, data metadata and vocabularies)"
            )
        got[path] = download(run_id, tracking_uri, path, dst / run_id / path.replace("/", "_"))
    cfg = load_config(str(got[CONFIG_ARTIFACT]), [])
    cfg.tracking.uri = tracking_uri  # where the run's model is, whatever the run's own config said
    meta = Metadata.model_validate_json(got["data/metadata.json"].read_text())
    return LoggedRun(run_id, cfg, meta, got["vocab"].parent)


def open_window(path: str | Path) -> Window:
    """Read a prepared window's metadata and all its splits."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import SPLITS, read_metadata

    meta = read_metadata(path)
    return Window(Path(path), meta, {s: read_split_arrays(path, s, meta) for s in SPLITS})


def check_unseen(run: LoggedRun, window: Window) -> None:
    """Refuse a window the run trained on, as far as the run's records tell."""
    # data.train_dirs: the earlier windows a multi-window run also trained on (issue 18), when present.
    trained = [run.cfg.data.prepared_dir, *getattr(run.cfg.data, "train_dirs", [])]
    same_dir = any(Path(d).resolve() == window.path.resolve() for d in trained)
    if same_dir or run.meta == window.meta:
        raise UserError(
            f"--data {window.path}: run {run.run_id} was trained on this prepared data "
            f"(its data.prepared_dir {run.cfg.data.prepared_dir}); gate on a newer window neither model "
            "trained on"
        )


def remap(run: LoggedRun, window: Window) -> dict[str, dict[str, np.ndarray]]:
    """The window's arrays in the run's vocabulary rows and feature order (unknown ids → row 0)."""
    from recsys.data.metadata import read_vocab
    from recsys.data.vocab import Vocab, row_mapping

    if run.meta.dense_features != window.meta.dense_features:
        raise UserError(
            f"--data {window.path}: dense features {window.meta.dense_features} differ from run "
            f"{run.run_id}'s {run.meta.dense_features}; prepare the window with the run's data settings"
        )
    cols, maps = [], []
    for f in run.meta.sparse_features:
        j = window.meta.sparse_index(f.name)
        w = window.meta.sparse_features[j]
        if "exact" not in (f.table, w.table) or f.table != w.table:
            raise UserError(
                f"feature {f.name!r}: promotion maps rows by raw id, which needs exact vocabularies "
                f"(run {run.run_id}: {f.table}, window: {w.table})"
            )
        old = Vocab(read_vocab(run.vocab_root, f)[1:])
        new = Vocab(read_vocab(window.path, w)[1:])
        cols.append(j)
        maps.append(row_mapping(old, new))
    out = {}
    for split, a in window.arrays.items():
        sparse = np.empty((len(a["label"]), len(cols)), np.int64)
        for i, (j, m) in enumerate(zip(cols, maps, strict=True)):
            sparse[:, i] = m[a["sparse"][:, j]]
        out[split] = {"label": a["label"], "dense": a["dense"], "sparse": sparse}
    return out


def default_metric(cfg: Config) -> str:
    """promotion.metric, with auto resolved: ndcg@10 for two_tower, auc for dlrm."""
    metric = cfg.promotion.metric
    if metric != "auto":
        return metric
    return "ndcg@10" if cfg.model.kind == "two_tower" else "auc"


def _load_task(run: LoggedRun) -> object:
    """The run's plain model, on CPU, with its logged weights."""
    from recsys.models.task import build_task
    from recsys.tracking import load_logged_state

    task = build_task(run.cfg, run.meta, ebc_device="cpu", training=False)
    missing, _ = task.load_state_dict(load_logged_state(run.cfg, run.run_id), strict=False)
    if missing:
        raise UserError(f"run {run.run_id}: its logged model lacks {missing[:3]} for its own config")
    return task


def score(run: LoggedRun, window: Window, metric: str, split: str) -> dict[str, float]:
    """Every metric of `run` on the window's `split` (the gate reads one of them: `metric`)."""
    arrays = remap(run, window)
    task = _load_task(run)
    if run.cfg.model.kind == "two_tower":
        from recsys.evaluate import evaluate_retrieval

        cfg = run.cfg.model_copy(deep=True)
        if metric.partition("@")[2].isdigit():
            cfg.eval.ks = sorted({*cfg.eval.ks, int(metric.partition("@")[2])})
        out, _ = evaluate_retrieval(task, cfg, run.meta, arrays, split, baseline=False)
    else:
        out = _ctr_metrics(task, run, arrays[split])
    if metric not in out or math.isnan(out[metric]):
        raise UserError(
            f"promotion.metric {metric!r}: not measured for run {run.run_id} on {window.path} {split} "
            f"(have: {', '.join(k for k, v in sorted(out.items()) if not math.isnan(v))})"
        )
    return out


def _ctr_metrics(task: object, run: LoggedRun, a: dict[str, np.ndarray]) -> dict[str, float]:
    """AUC / log loss / calibration of a plain DLRM on one split's arrays, in batches."""
    import torch

    from recsys.data.loader import to_batch
    from recsys.metrics import CTRMetrics

    task.eval()  # type: ignore[attr-defined]
    names = [f.name for f in run.meta.sparse_features]
    ctr, bs = CTRMetrics(), run.cfg.eval.batch_size
    with torch.no_grad():
        for s in range(0, len(a["label"]), bs):
            batch = to_batch(a["label"][s : s + bs], a["dense"][s : s + bs], a["sparse"][s : s + bs].T, names)
            _, (_, logits, labels) = task(batch)  # type: ignore[operator]
            ctr.update(torch.sigmoid(logits), labels)
    return ctr.compute()

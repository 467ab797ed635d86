"""A trained Two-Tower MLflow run as retrieval needs it: checked, its config and embeddings fetched.

Everything goes through MLflow's client (`MlflowClient`, `mlflow.artifacts.download_artifacts`), so
the same code reads a local SQLite store, a tracking server or Databricks. Bad input (an unknown run,
a run that is not a Two-Tower, missing embeddings) is a `UserError` with one line that says what to do.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config

#: Artifacts of a Two-Tower run this package reads (written by recsys.train / recsys.evaluate).
CONFIG_ARTIFACT = "config/resolved.yaml"
EMBEDDINGS_DIR = "embeddings"
INDEX_DIR = "index"


def tracking_uri(explicit: str | None = None, cfg: Config | None = None) -> str:
    """--tracking-uri, else the given config's URI, else $MLFLOW_TRACKING_URI, else the local store."""
    from recsys.tracking import LOCAL_DIR, resolve_tracking_uri

    if explicit:
        return explicit
    if cfg is not None:
        return resolve_tracking_uri(cfg)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    # Same default as recsys.tracking.resolve_tracking_uri for a config without tracking.uri.
    return "sqlite:///" + str((Path.cwd() / LOCAL_DIR / "mlflow.db").resolve())


@dataclass
class Embeddings:
    """One side's embeddings as logged: raw ids, vocabulary rows and vectors, in the same order."""

    ids: np.ndarray  # object [n], raw ids (str)
    rows: np.ndarray  # int64 [n], embedding (vocabulary) rows
    vectors: np.ndarray  # float32 [n, d], C-contiguous (what faiss takes)


@dataclass
class TwoTowerRun:
    """A checked Two-Tower run: its id, where it lives and its resolved config."""

    run_id: str
    tracking_uri: str
    cfg: Config

    def client(self) -> Any:
        """An MlflowClient on the run's tracking URI."""
        import mlflow

        return mlflow.MlflowClient(self.tracking_uri)

    def has_artifact(self, path: str) -> bool:
        """Whether the run holds an artifact file or folder `path`."""
        return has_artifact(self.run_id, self.tracking_uri, path)

    def download(self, path: str, dst: str | Path) -> Path:
        """Download artifact `path` (file or folder) into `dst`; returns the local path."""
        return download(self.run_id, self.tracking_uri, path, dst)

    def embeddings(self, side: str) -> Embeddings:
        """The run's `embeddings/{side}_embeddings.parquet` (side: user or item)."""
        with tempfile.TemporaryDirectory() as tmp:
            return read_embeddings(self.download(f"{EMBEDDINGS_DIR}/{side}_embeddings.parquet", tmp))


def has_artifact(run_id: str, uri: str, path: str) -> bool:
    """Whether run `run_id` holds an artifact file or folder `path`."""
    import mlflow

    parent = path.rsplit("/", 1)[0] if "/" in path else None
    return any(f.path == path for f in mlflow.MlflowClient(uri).list_artifacts(run_id, parent))


def download(run_id: str, uri: str, path: str, dst: str | Path) -> Path:
    """Download artifact `path` (file or folder) of run `run_id` into `dst`; returns the local path."""
    import mlflow

    # Per-file tqdm bars would bury the one summary line the commands print (unless asked for).
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

    return Path(
        mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=path, dst_path=str(dst), tracking_uri=uri
        )
    )


def read_embeddings(path: str | Path) -> Embeddings:
    """Read an embeddings Parquet file (columns id, row, embedding = fixed-size list of float32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    col = table.column("embedding").combine_chunks()
    if not pa.types.is_fixed_size_list(col.type):
        raise UserError(f"{path}: column 'embedding' is {col.type}, expected a fixed-size list")
    dim = col.type.list_size
    vectors = np.ascontiguousarray(col.flatten().to_numpy(zero_copy_only=False), np.float32)
    return Embeddings(
        ids=np.asarray(table.column("id").to_pylist(), dtype=object),
        rows=table.column("row").to_numpy().astype(np.int64),
        vectors=vectors.reshape(len(table), dim),
    )


def _get_run(run_id: str, uri: str) -> Any:
    import mlflow
    from mlflow.exceptions import MlflowException

    from recsys.tracking import _check_not_file_store, is_gone, short_error, wait_for_server

    _check_not_file_store(uri)
    wait_for_server(uri, 30)  # an absent server is one line naming it, not "run not found"
    try:
        return mlflow.MlflowClient(uri).get_run(run_id)
    except MlflowException as e:
        if not is_gone(e) and e.get_http_status_code() >= 500:
            raise UserError(
                f"tracking URI {uri}: the MLflow server did not answer for run {run_id} ({short_error(e)}); "
                "try again when it is back"
            ) from None
        raise UserError(
            f"run {run_id!r}: not found in {uri} ({e.error_code}); pass the run id of a trained "
            "Two-Tower and --tracking-uri of its MLflow"
        ) from None


def open_run(
    run_id: str, uri: str | None = None, config: str | None = None, overrides: list[str] | None = None
) -> TwoTowerRun:
    """Check that `run_id` is a Two-Tower run with embeddings; load its config.

    The config is the run's `config/resolved.yaml`, or `config` (a name or path) when given; `overrides`
    (`a.b=v`) apply on top, e.g. `data.prepared_dir=…` when the prepared folder has moved.
    """
    from recsys.config import load_config

    cfg = load_config(config, overrides) if config is not None else None
    uri = tracking_uri(uri, cfg)  # a given config's tracking.uri finds the run, as for `recsys evaluate`
    if run_id.startswith("models:/"):  # models:/NAME@champion: the run behind the aliased version
        from recsys.promotion.registry import run_of

        run_id = run_of(run_id, uri)
    run = _get_run(run_id, uri)
    model = run.data.tags.get("model")
    if model is not None and model not in ("two_tower", "sequential"):  # both export user/item vectors
        raise UserError(
            f"run {run_id} is a {model} run, not a Two-Tower: only Two-Tower runs have user/item "
            "embeddings to retrieve from"
        )
    wanted = [f"{EMBEDDINGS_DIR}/{s}_embeddings.parquet" for s in ("user", "item")]
    missing = [p for p in wanted if not has_artifact(run_id, uri, p)]
    if missing:
        raise UserError(
            f"run {run_id} has no {', '.join(missing)}: not a Two-Tower run, or it was trained with "
            "tracking.log_model=false"
        )
    if cfg is not None:
        return TwoTowerRun(run_id, uri, cfg)
    if not has_artifact(run_id, uri, CONFIG_ARTIFACT):
        raise UserError(f"run {run_id} has no {CONFIG_ARTIFACT}; pass --config with the training config")
    with tempfile.TemporaryDirectory() as tmp:
        return TwoTowerRun(run_id, uri, load_config(download(run_id, uri, CONFIG_ARTIFACT, tmp), overrides))

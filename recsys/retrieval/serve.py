"""A Two-Tower run as an MLflow pyfunc model: `{"user_id": "...", "k": 10}` → ranked raw item ids.

`recsys serve build --run-id R [--register NAME]` packs what `recsys recommend` reads from the run and
its prepared folder into model artifacts, so serving needs neither the run nor the data:
  index/            the run's FAISS index (or an exact flat one), raw item ids (`recsys.retrieval.index`)
  users.parquet     the run's user embeddings, keyed by raw user id
  seen.npz          per user (embedding position) the index positions of its train items (CSR)
  popularity.npy    train positives per index position: the list of users the run does not know

`predict` answers one row per request row: user_id, items (best first), scores, fallback (True: the
user is unknown and got the most popular items). It searches with `search_unseen`, the function
`recsys recommend` uses, so a served list equals the batch one. Bad input raises MlflowException
INVALID_PARAMETER_VALUE, which `mlflow models serve` answers with HTTP 400 and the message.

This module imports mlflow at import time (the model class must subclass PythonModel at module level
so the logged model unpickles it by reference); only `recsys serve` imports it.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

#: Name of the logged model inside the run (its artifact folder).
MODEL_NAME = "retrieval"
INDEX_ART, USERS_ART, SEEN_ART, POPULAR_ART = "index", "users.parquet", "seen.npz", "popularity.npy"
#: k used when a request row has none.
DEFAULT_K = 10
#: Largest k a request may ask for (bounds the work one request can cause).
MAX_K = 1000


def _bad(message: str) -> MlflowException:
    """An error `mlflow models serve` turns into HTTP 400 with `message`."""
    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def parse_requests(df: Any) -> tuple[list[str], np.ndarray]:
    """(user ids, k per row) of a request frame with columns user_id and optional k; bad input → 400."""
    if not isinstance(df, pd.DataFrame):
        raise _bad(f"expected a table with columns user_id, k; got {type(df).__name__}")
    if "user_id" not in df.columns:
        raise _bad(
            f"missing column 'user_id' (got columns: {', '.join(map(str, df.columns)) or 'none'}); "
            'send {"dataframe_records": [{"user_id": "...", "k": 10}]}'
        )
    users = df["user_id"]
    if users.isna().any():
        raise _bad(f"user_id is empty in row(s) {np.flatnonzero(users.isna().to_numpy()).tolist()}")
    k = df["k"] if "k" in df.columns else pd.Series(DEFAULT_K, index=df.index)
    # A record without k (NaN once records become a frame) gets the default, like a frame without k.
    k = k.astype(object).where(k.notna(), DEFAULT_K)
    values = pd.to_numeric(k, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
    # bool is numeric to pandas; reject it like a string (true is not a list length).
    bad = (
        ~np.isfinite(values) | (values != np.round(values)) | k.map(lambda v: isinstance(v, bool)).to_numpy()
    )
    if bad.any():
        raise _bad(f"k must be an integer; got {k[bad].tolist()!r}")
    if ((values < 1) | (values > MAX_K)).any():
        raise _bad(f"k must be between 1 and {MAX_K}; got {k[(values < 1) | (values > MAX_K)].tolist()!r}")
    return [str(u) for u in users], values.astype(np.int64)


@dataclass
class ServingState:
    """What a request needs, loaded once: index, user vectors, seen items, popularity order."""

    index: Any  # ItemIndex
    user_pos: dict[str, int]
    user_vectors: np.ndarray  # float32 [users, dim]
    seen: tuple[np.ndarray, np.ndarray]  # CSR over user positions → index positions
    popular: np.ndarray  # index positions, most popular first
    popular_counts: np.ndarray  # their train counts (the fallback's score)
    exact: Any  # builds the exact index once, on first use (refills what an approximate one misses)


def load_state(artifacts: dict[str, str]) -> ServingState:
    """Read the artifacts `build_model` logs (paths by artifact name)."""
    from recsys.retrieval.index import ItemIndex
    from recsys.retrieval.recommend import _exact_of
    from recsys.retrieval.runs import read_embeddings

    users = read_embeddings(artifacts[USERS_ART])
    seen = np.load(artifacts[SEEN_ART])
    counts = np.load(artifacts[POPULAR_ART])
    popular = np.argsort(-counts, kind="stable")  # ties: lower index position, as `recommend` does
    index = ItemIndex.load(artifacts[INDEX_ART])
    return ServingState(
        index=index,
        user_pos={u: j for j, u in enumerate(users.ids)},
        user_vectors=users.vectors,
        seen=(seen["indptr"], seen["items"]),
        popular=popular,
        popular_counts=counts[popular],
        exact=_exact_of(index),
    )


def answer(state: ServingState, users: list[str], ks: np.ndarray) -> pd.DataFrame:
    """One row per request: user_id, items, scores, fallback."""
    from recsys.retrieval.recommend import search_unseen

    pos = np.array([state.user_pos.get(u, -1) for u in users], np.int64)
    known = np.flatnonzero(pos >= 0)
    items, scores = [None] * len(users), [None] * len(users)
    if len(known):
        # One search at the largest k asked: a shorter list is a prefix of a longer one.
        k = int(ks[known].max())
        s, found = search_unseen(state.index, state.user_vectors, pos[known], state.seen, k, state.exact)
        for row, sc, f in zip(known, s, found, strict=True):
            keep = f[: ks[row]] >= 0
            items[row] = state.index.item_ids[f[: ks[row]][keep]].tolist()
            scores[row] = sc[: ks[row]][keep].astype(float).tolist()
    for row in np.flatnonzero(pos < 0):
        top = state.popular[: ks[row]]
        items[row] = state.index.item_ids[top].tolist()
        scores[row] = state.popular_counts[: ks[row]].astype(float).tolist()
    return pd.DataFrame({"user_id": users, "items": items, "scores": scores, "fallback": pos < 0})


class RetrievalModel(mlflow.pyfunc.PythonModel):
    """Top-k unseen items of a Two-Tower run per request row; popularity for unknown users."""

    def load_context(self, context: Any) -> None:
        """Load index, embeddings, seen items and popularity from the model's artifacts."""
        self._state = load_state(context.artifacts)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Rows {user_id, k} → rows {user_id, items, scores, fallback}."""
        users, ks = parse_requests(model_input)
        return answer(self._state, users, ks)


# --------------------------------------------------------------------------------------------- build
def pip_requirements() -> list[str]:
    """Pinned requirements of the served model, from what is installed (serving needs no torch)."""
    reqs = []
    for dist in ("mlflow", "faiss-cpu", "numpy", "pandas", "pyarrow", "recsys"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return reqs


def signature() -> Any:
    """Input user_id (string), k (an integer, checked by `parse_requests`); output user_id, items, scores, fallback."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema

    # Both optional to MLflow's schema check, and k of any type, so bad requests reach
    # `parse_requests` and get its messages: the scoring server casts JSON to a `long` column with
    # astype, which turns k=2.5 into 2 instead of refusing it.
    inputs = Schema([ColSpec("string", "user_id", required=False), ColSpec(AnyType(), "k", required=False)])
    outputs = Schema(
        [
            ColSpec("string", "user_id"),
            ColSpec(Array("string"), "items"),
            ColSpec(Array("double"), "scores"),
            ColSpec("boolean", "fallback"),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def write_artifacts(run_id: str, uri: str | None, folder: Path) -> tuple[dict[str, str], Any]:
    """Gather a run's serving artifacts into `folder` → (artifact paths by name, the opened run).

    Same inputs as `recsys recommend`: the run's embeddings and index, seen items of its train split.
    """
    from recsys.retrieval.recommend import _check_vocab, _prepared, _run_index, popularity, seen_csr
    from recsys.retrieval.runs import EMBEDDINGS_DIR, open_run

    run = open_run(run_id, uri)
    meta, prepared = _prepared(run)
    u_emb, i_emb = run.embeddings("user"), run.embeddings("item")
    _check_vocab(prepared, meta, meta.user_feature or "", u_emb.ids, u_emb.rows)
    _check_vocab(prepared, meta, meta.item_feature or "", i_emb.ids, i_emb.rows)
    index = _run_index(run, i_emb)
    # Query j = embedding position j of users.parquet, the position `answer` looks up.
    query_of_row = np.full(int(u_emb.rows.max(initial=0)) + 1, -1, np.int64)
    query_of_row[u_emb.rows] = np.arange(len(u_emb.rows))
    pos_of_row = np.full(int(index.item_rows.max(initial=0)) + 1, -1, np.int64)
    pos_of_row[index.item_rows] = np.arange(len(index.item_rows))
    indptr, items = seen_csr(prepared, meta, ("train",), query_of_row, pos_of_row)
    paths = {
        INDEX_ART: str(index.save(folder / INDEX_ART)),
        USERS_ART: str(run.download(f"{EMBEDDINGS_DIR}/user_embeddings.parquet", folder)),
        SEEN_ART: str(folder / SEEN_ART),
        POPULAR_ART: str(folder / POPULAR_ART),
    }
    np.savez(paths[SEEN_ART], indptr=indptr, items=items)
    np.save(paths[POPULAR_ART], popularity(prepared, meta, pos_of_row))
    return paths, run


def _first_user(users_parquet: str) -> str:
    """A known user id for the logged input example."""
    import pyarrow.parquet as pq

    return str(pq.read_table(users_parquet, columns=["id"]).column("id")[0].as_py())


@dataclass
class BuiltModel:
    """Where `build_model` put the model."""

    model_uri: str  # runs:/… / models:/m-… URI of the logged model
    name: str | None  # registered model name
    version: str | None  # registered version
    artifact_uri: str  # storage location of the model files (what KServe's storageUri points at)


def build_model(run_id: str, uri: str | None = None, register: str | None = None) -> BuiltModel:
    """Log the serving model of Two-Tower run `run_id` into that run and register it as `register`
    (default `recsys-<config name>`; '' = do not register)."""
    with tempfile.TemporaryDirectory() as tmp:
        artifacts, run = write_artifacts(run_id, uri, Path(tmp))
        name = f"recsys-{run.cfg.name}" if register is None else register or None
        mlflow.set_tracking_uri(run.tracking_uri)
        example = pd.DataFrame({"user_id": [_first_user(artifacts[USERS_ART])], "k": [DEFAULT_K]})
        with mlflow.start_run(run_id=run.run_id):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=RetrievalModel(),
                artifacts=artifacts,
                signature=signature(),
                input_example=example,
                pip_requirements=pip_requirements(),
                registered_model_name=name,
            )
    version = info.registered_model_version
    location = mlflow.get_logged_model(info.model_id).artifact_location
    return BuiltModel(info.model_uri, name, None if version is None else str(version), location)

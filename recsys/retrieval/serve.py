"""A Two-Tower run as an MLflow pyfunc model: `{"user_id": "...", "k": 10}` → ranked raw item ids.

`recsys serve build --run-id R [--register NAME]` packs what `recsys recommend` reads from the run and
its prepared folder into model artifacts, so serving needs neither the run nor the data:
  index/            the run's FAISS index (or an exact flat one), raw item ids (`recsys.retrieval.index`)
  users.parquet     the run's user embeddings, keyed by raw user id
  seen.npz          per user (embedding position) the index positions of its train items (CSR)
  popularity.npy    train positives per index position: the list of users the run does not know

The model is logged from code (MLflow models-from-code): `serve_model.py` is the model, and the
`recsys` package's serving modules travel with it as code_paths, so loading it unpickles nothing
and needs no installed recsys — only the pip requirements recorded in the model.

`predict` answers one row per request row: user_id, items (best first), scores, fallback (True: the
user is unknown and got the most popular items). It searches with `search_unseen`, the function
`recsys recommend` uses, so a served list equals the batch one. Bad input (no user_id, an empty one,
a wrong type, k outside 1..MAX_K, more than MAX_ROWS rows, a history item that is no id) raises
`BadRequest`, which `mlflow models serve` and MLServer both answer with HTTP 400 and the message
(docs/guides/serving.md).
"""

from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from recsys.retrieval.raw_ids import raw_id, why_not

try:  # present where KServe's MLflow runtime (MLServer) serves the model
    from mlserver.errors import MLServerError as _ServerError
except ImportError:
    _ServerError = Exception

#: Name of the logged model inside the run (its artifact folder).
MODEL_NAME = "retrieval"
INDEX_ART, USERS_ART, SEEN_ART, POPULAR_ART = "index", "users.parquet", "seen.npz", "popularity.npy"
#: The history encoder folder (recsys.retrieval.history_users), only for runs whose model reads histories.
ENCODER_ART = "history_encoder"
#: k used when a request row has none.
DEFAULT_K = 10
#: Largest k a request may ask for (bounds the work one request row can cause).
MAX_K = 1000
#: Most rows one request may hold: with MAX_K it bounds one request's search, memory and answer size
#: (1000 × 1000 items); scoring many users at once is `recsys recommend`'s job.
MAX_ROWS = 1000
#: The columns a request row may have.
REQUEST_COLUMNS = ("user_id", "k", "history")
#: The model's code file (models-from-code) and the package files it imports at serving time, shipped
#: with the model as code_paths; tests check that the model loads where recsys is not installed.
MODEL_CODE = Path(__file__).with_name("serve_model.py")
SERVING_CODE = (
    "__init__.py",
    "errors.py",
    "retrieval/__init__.py",
    "retrieval/index.py",
    "retrieval/raw_ids.py",
    "retrieval/recommend.py",
    "retrieval/runs.py",
    "retrieval/search.py",
    "retrieval/serve.py",
    "retrieval/serve_model.py",
)


class BadRequest(MlflowException, _ServerError):
    """A request the model refuses, answered with HTTP 400 and the message by `mlflow models serve`
    (INVALID_PARAMETER_VALUE) and by MLServer (an MLServerError with status 400; any other exception
    from a model is a 500 there)."""

    def __init__(self, message: str) -> None:
        MlflowException.__init__(self, message, error_code=INVALID_PARAMETER_VALUE)
        self.status_code = 400


def _bad(message: str) -> BadRequest:
    """An error both model servers turn into HTTP 400 with `message`."""
    return BadRequest(message)


def _some(values: Any, n: int = 5) -> str:
    """The first `n` of `values` for a message, and how many there are when more (messages stay short)."""
    values = list(values)
    shown = ", ".join(repr(v)[:40] for v in values[:n])
    return f"[{shown}{f', … ({len(values):,} in all)' if len(values) > n else ''}]"


def _k_value(v: Any) -> float:
    """k as a float (NaN: not a number at all); bool and str are refused, not read as numbers."""
    if isinstance(v, bool | np.bool_) or not isinstance(v, int | float | np.integer | np.floating):
        return math.nan
    try:
        return float(v)
    except OverflowError:  # an int too large for a float is out of range, not malformed
        return math.inf


def parse_requests(df: Any) -> tuple[list[str], np.ndarray]:
    """(user ids, k per row) of a request frame with columns user_id and optional k; bad input → 400."""
    if not isinstance(df, pd.DataFrame):
        raise _bad(f"expected a table with columns user_id, k; got {type(df).__name__}")
    if len(df) > MAX_ROWS:
        raise _bad(
            f"{len(df):,} rows in one request; at most {MAX_ROWS:,}: split the request "
            "(or score many users with `recsys recommend`)"
        )
    unknown = [str(c) for c in df.columns if c not in REQUEST_COLUMNS]
    if unknown:
        raise _bad(
            f"unknown column(s) {_some(unknown)}: a request row has user_id and, optionally, k and history"
        )
    if "user_id" not in df.columns:
        raise _bad(
            f"missing column 'user_id' (got columns: {', '.join(map(str, df.columns)) or 'none'}); "
            'send {"dataframe_records": [{"user_id": "...", "k": 10}]}'
        )
    users = df["user_id"]
    if users.isna().any():
        raise _bad(f"user_id is empty in row(s) {_some(np.flatnonzero(users.isna().to_numpy()).tolist())}")
    not_str = users.map(lambda u: not isinstance(u, str)).to_numpy(dtype=bool)
    if not_str.any():
        raise _bad(f"user_id must be a string; got {_some(users[not_str].tolist())}")
    # "" or "  " would be an unknown user silently answered with the popularity list.
    blank = users.map(lambda u: raw_id(u) is None).to_numpy(dtype=bool)
    if blank.any():
        raise _bad(f"user_id is empty or blank in row(s) {_some(np.flatnonzero(blank).tolist())}")
    k = df["k"] if "k" in df.columns else pd.Series(DEFAULT_K, index=df.index)
    # A record without k (NaN once records become a frame) gets the default, like a frame without k.
    k = k.astype(object).where(k.notna(), DEFAULT_K)
    values = np.array([_k_value(v) for v in k], np.float64)
    bad = np.isnan(values) | (np.isfinite(values) & (values != np.round(values)))
    if bad.any():
        raise _bad(f"k must be an integer; got {_some(k[bad].tolist())}")
    out = (values < 1) | (values > MAX_K)
    if out.any():
        raise _bad(f"k must be between 1 and {MAX_K}; got {_some(k[out].tolist())}")
    return users.tolist(), values.astype(np.int64)


def parse_histories(df: pd.DataFrame) -> list[list[str] | None] | None:
    """Per row, the request's `history` (raw item ids, most recent last; None: the row has none), or
    None when the request has no history column; a history that is not a list of ids → 400."""
    if "history" not in df.columns:
        return None
    out: list[list[str] | None] = []
    for row, h in enumerate(df["history"]):
        if h is None or (isinstance(h, float) and math.isnan(h)):
            out.append(None)
        elif isinstance(h, list | tuple | np.ndarray):
            out.append(_history_ids(h, row))
        else:
            raise _bad(
                f"history in row {row} must be a list of item ids (most recent last); got {repr(h)[:60]}"
            )
    return out


def _history_ids(history: Any, row: int) -> list[str]:
    """One request row's history as raw ids (`raw_ids.raw_id`: text or an integer's digits); a null,
    empty, blank, bool or float item → 400 naming the row and the item (it would count as unknown)."""
    ids = []
    for n, item in enumerate(history, 1):
        rid = raw_id(item)
        if rid is None:
            raise _bad(
                f"history in row {row}: item {n} is {why_not(item)}; send item ids as non-empty text "
                "(or integers)"
            )
        ids.append(rid)
    return ids


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
    encoder: Any = None  # HistoryEncoder of a run whose model reads histories, else None
    # The history path's depth beyond k: the run's 99th-percentile seen count (search.first_depth),
    # computed once at load, not on every request (a quantile over every user).
    seen_depth: int = 0


def load_state(artifacts: dict[str, str]) -> ServingState:
    """Read the artifacts `build_model` logs (paths by artifact name)."""
    from recsys.retrieval.index import ItemIndex
    from recsys.retrieval.recommend import _exact_of
    from recsys.retrieval.runs import read_embeddings

    users = read_embeddings(artifacts[USERS_ART])
    seen = np.load(artifacts[SEEN_ART])
    counts = np.load(artifacts[POPULAR_ART])
    popular = np.argsort(-counts, kind="stable")  # ties: lower index position, as `recommend` does
    from recsys.retrieval.search import first_depth

    index = ItemIndex.load(artifacts[INDEX_ART])
    return ServingState(
        index=index,
        user_pos={u: j for j, u in enumerate(users.ids)},
        user_vectors=users.vectors,
        seen=(seen["indptr"], seen["items"]),
        popular=popular,
        popular_counts=counts[popular],
        exact=_exact_of(index),
        encoder=_load_encoder(artifacts),
        seen_depth=first_depth(np.diff(seen["indptr"]), 0),
    )


#: Environment variable: torch intra-op threads of a served model that runs torch (default 1).
TORCH_THREADS_ENV = "RECSYS_SERVE_TORCH_THREADS"


def set_torch_threads() -> None:
    """One torch thread per server worker unless $RECSYS_SERVE_TORCH_THREADS says otherwise: a request's
    forward is small, and more threads only contend with the other workers' and clients' (measured:
    two-stage p99 on 2 busy cores, docs/guides/two-stage-serving.md)."""
    import os

    import torch

    torch.set_num_threads(int(os.environ.get(TORCH_THREADS_ENV, "1")))


def _load_encoder(artifacts: dict[str, str]) -> Any:
    """The history encoder of a model that carries one (imports torch and the models only then)."""
    if ENCODER_ART not in artifacts:
        return None
    from recsys.retrieval.history_users import HistoryEncoder

    set_torch_threads()

    return HistoryEncoder.load(artifacts[ENCODER_ART])


def _answer_histories(
    state: ServingState, users: list[str], ks: np.ndarray, histories: list[list[str] | None]
) -> tuple[np.ndarray, list[Any], list[Any], np.ndarray]:
    """(rows answered, items, scores, unknown item counts) of the rows with a history, through
    `recommend_histories`, the function `recsys recommend --history-file` uses."""
    rows = np.array([j for j, h in enumerate(histories) if h is not None], np.int64)
    items, scores, unknown = [None] * len(users), [None] * len(users), np.zeros(len(users), np.int64)
    if not len(rows):
        return rows, items, scores, unknown
    if state.encoder is None:
        raise _bad(
            "this model's run does not read histories (model.kind sequential, or a Two-Tower with "
            "history_pooling, does): send user_id and k only"
        )
    # Only here: a plain model's code (SERVING_CODE) does not carry this module.
    from recsys.retrieval.history_users import recommend_histories

    k = int(ks[rows].max())
    # The batch path's depth: k + the run's 99th-percentile seen count (a row's list must not depend
    # on the other rows of its request).
    depth = k + state.seen_depth
    s, found, unk = recommend_histories(
        state.encoder, state.index, state.seen, state.user_pos, [users[j] for j in rows],
        [histories[j] for j in rows], k, state.exact, depth,
    )  # fmt: skip
    for j, sc, f, u in zip(rows, s, found, unk, strict=True):
        keep = f[: ks[j]] >= 0
        items[j] = state.index.item_ids[f[: ks[j]][keep]].tolist()
        scores[j] = sc[: ks[j]][keep].astype(float).tolist()
        unknown[j] = u
    return rows, items, scores, unknown


def answer(
    state: ServingState, users: list[str], ks: np.ndarray, histories: list[list[str] | None] | None = None
) -> pd.DataFrame:
    """One row per request: user_id, items, scores, fallback (and unknown_items with histories)."""
    from recsys.retrieval.search import search_unseen

    pos = np.array([state.user_pos.get(u, -1) for u in users], np.int64)
    with_history = np.zeros(len(users), bool)
    if histories is not None:
        done, items, scores, unknown = _answer_histories(state, users, ks, histories)
        with_history[done] = True
    else:
        items, scores = [None] * len(users), [None] * len(users)
    known = np.flatnonzero((pos >= 0) & ~with_history)
    if len(known):
        # One search at the largest k asked: a shorter list is a prefix of a longer one.
        k = int(ks[known].max())
        s, found = search_unseen(state.index, state.user_vectors, pos[known], state.seen, k, state.exact)
        for row, sc, f in zip(known, s, found, strict=True):
            keep = f[: ks[row]] >= 0
            items[row] = state.index.item_ids[f[: ks[row]][keep]].tolist()
            scores[row] = sc[: ks[row]][keep].astype(float).tolist()
    for row in np.flatnonzero((pos < 0) & ~with_history):
        top = state.popular[: ks[row]]
        items[row] = state.index.item_ids[top].tolist()
        scores[row] = state.popular_counts[: ks[row]].astype(float).tolist()
    # user_id as object, not pandas 3's `str` dtype: MLServer's V2 codec knows object and numpy
    # strings only (a `str` column is a KeyError 'O' in its to_datatype, an HTTP 500).
    user_ids = pd.Series(users, dtype=object)
    out = {"user_id": user_ids, "items": items, "scores": scores, "fallback": (pos < 0) & ~with_history}
    if histories is not None:
        out["unknown_items"] = unknown  # history item ids the run does not know (dropped)
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------- build
#: The served model's pandas, chosen apart from the venv that builds it (docs/serving.md, "pandas"):
#: both lines serve it, tested at each end (3.1.1 under `mlflow models serve`, 2.3.3 under MLServer,
#: the line KServe's MLflow runtime ships: kserve pins pandas<3). A range, not the builder's pin, so
#: a runtime image that brings its own pandas 2.x matches it.
MODEL_PANDAS = "pandas>=2.2,<4"


#: What a history encoder's model needs besides: the model (torch, TorchRec) and the config (pydantic).
ENCODER_DISTS = ("torch", "torchrec", "fbgemm-gpu-cpu", "pydantic", "pyyaml")


def pip_requirements(encoder: bool = False) -> list[str]:
    """Pinned requirements of the served model (no recsys: its code travels with it; torch only for a
    model with a history encoder)."""
    reqs = []
    for dist in ("mlflow", "faiss-cpu", "numpy", "pyarrow", *(ENCODER_DISTS if encoder else ())):
        try:
            reqs.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            continue
    return [*reqs, MODEL_PANDAS]


def code_paths(folder: Path, whole: bool = False) -> list[str]:
    """Copy the package files serving imports (`SERVING_CODE`; `whole`: the whole package, what a
    history encoder's model needs) to `folder`/recsys → MLflow code_paths."""
    package = Path(__file__).resolve().parents[1]
    if whole:
        shutil.copytree(package, folder / "recsys", ignore=shutil.ignore_patterns("__pycache__"))
        return [str(folder / "recsys")]
    for rel in SERVING_CODE:
        (folder / "recsys" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(package / rel, folder / "recsys" / rel)
    return [str(folder / "recsys")]


def signature() -> Any:
    """Input user_id (string), k (an integer, checked by `parse_requests`); output user_id, items, scores, fallback."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, Array, ColSpec, Schema

    # Both optional to MLflow's schema check, and k of any type, so bad requests reach
    # `parse_requests` and get its messages: the scoring server casts JSON to a `long` column with
    # astype, which turns k=2.5 into 2 instead of refusing it.
    inputs = Schema(
        [
            ColSpec("string", "user_id", required=False),
            ColSpec(AnyType(), "k", required=False),
            ColSpec(AnyType(), "history", required=False),
        ]
    )
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

    folder.mkdir(parents=True, exist_ok=True)
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
    from recsys.retrieval.history_users import open_encoder, reads_history

    if reads_history(run.cfg):
        encoder = open_encoder(run.cfg, run.run_id, prepared)
        paths[ENCODER_ART] = str(encoder.save(folder / ENCODER_ART, prepared))
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
        artifacts, run = write_artifacts(run_id, uri, Path(tmp) / "artifacts")
        name = f"recsys-{run.cfg.name}" if register is None else register or None
        return log_served_model(
            run, MODEL_NAME, MODEL_CODE, artifacts, Path(tmp), ENCODER_ART in artifacts, signature(), name
        )


def log_served_model(
    run: Any,
    model_name: str,
    model_code: Path,
    artifacts: dict[str, str],
    tmp: Path,
    whole: bool,
    sig: Any,
    register: str | None,
    tags: dict[str, str] | None = None,
) -> BuiltModel:
    """Log a models-from-code pyfunc (`model_code`, `artifacts`, the serving code; `whole`: the whole
    package, for models that run torch) into `run` (a TwoTowerRun), registered as `register` unless None."""
    import mlflow

    mlflow.set_tracking_uri(run.tracking_uri)
    example = pd.DataFrame({"user_id": [_first_user(artifacts[USERS_ART])], "k": [DEFAULT_K]})
    with mlflow.start_run(run_id=run.run_id):
        info = mlflow.pyfunc.log_model(
            name=model_name,
            python_model=str(model_code),  # models-from-code: MLflow runs the file, pickles nothing
            artifacts=artifacts,
            code_paths=code_paths(tmp / "code", whole=whole),
            signature=sig,
            input_example=example,
            pip_requirements=pip_requirements(whole),
            registered_model_name=register,
        )
        for key, value in (tags or {}).items():
            mlflow.set_tag(key, value)
    version = info.registered_model_version
    location = mlflow.get_logged_model(info.model_id).artifact_location
    return BuiltModel(info.model_uri, register, None if version is None else str(version), location)

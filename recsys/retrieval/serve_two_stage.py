"""Retrieve → rank behind one endpoint: a Two-Tower run's top-N per request re-ranked by a ranking run.

`recsys serve build --run-id R --ranker-run-id RR [--candidates N]` logs one MLflow pyfunc (models from
code, `serve_two_stage_model.py`) into run R. Its artifacts are the retrieval model's (recsys.retrieval.serve:
index, user vectors, seen items, popularity, and the history encoder of a history model) plus `ranker/`:
the ranker's resolved config, its prepared data's metadata.json, the model's state dict, its user and
item vocabularies, the user/item feature tables and, for a ranker trained on `recsys data candidates`
rows, the history tables its dense features read. Loading it needs neither run nor data folder.

A request row is scored exactly as `recsys recommend --ranker-run-id` (retrieve_and_rank) scores a user:
the retrieval stage is `serve.answer` (the served retrieval model's code, equal to batch `recommend`)
at depth max(N, k); its list becomes the same (user, rank, item, score, fallback) table and goes through
`rank.score_table` and `rank.rerank`, the batch functions (dense features from
`candidates.dense_features`). Unknown users without a history keep the popularity list (fallback).
N defaults to the run tag `funnel.candidates` on the ranker run (set by `recsys bench funnel` for the N
val chose), else the ranker data's `data.candidates.top_n`, else DEFAULT_CANDIDATES.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.retrieval.rank import Ranker
    from recsys.retrieval.serve import BuiltModel, ServingState

#: Name of the logged two-stage model inside the retrieval run.
MODEL_NAME = "two_stage"
#: Artifact folder of the ranker and the settings file of the two stages.
RANKER_ART, SETTINGS_ART = "ranker", "two_stage.json"
#: Ranker run tag holding the N that `recsys bench funnel` chose on val.
CANDIDATES_TAG = "funnel.candidates"
#: N when neither the ranker run nor its data says one.
DEFAULT_CANDIDATES = 100
MODEL_CODE = Path(__file__).with_name("serve_two_stage_model.py")
CONFIG_FILE, META_FILE, STATE_FILE = "config.yaml", "metadata.json", "model.pt"
USERS_FILE, ITEMS_FILE, TABLES_SUBDIR = "users.json", "items.json", "tables"


# ------------------------------------------------------------------------------------ ranker folder
def save_ranker(ranker: Ranker, folder: Path) -> Path:
    """Write what scoring pairs needs (config, metadata, state dict, vocabularies, tables) to `folder`."""
    import torch

    from recsys.config import dump_config
    from recsys.data.metadata import metadata_path
    from recsys.retrieval.candidates import save_tables

    folder.mkdir(parents=True, exist_ok=True)
    (folder / CONFIG_FILE).write_text(dump_config(ranker.cfg))
    shutil.copyfile(metadata_path(ranker.cfg.data.prepared_dir), folder / META_FILE)
    torch.save(ranker.task.state_dict(), folder / STATE_FILE)
    for name, mapping in ((USERS_FILE, ranker.user_row), (ITEMS_FILE, ranker.item_row)):
        by_row = [""] * (max(mapping.values(), default=0) + 1)  # row 0 (OOV) an empty slot: rows stay rows
        for raw, row in mapping.items():
            by_row[row] = raw
        (folder / name).write_text(json.dumps(by_row))
    tables = folder / TABLES_SUBDIR
    if ranker.history is not None:
        save_tables(tables / "ranker", ranker.user_table, ranker.item_table, ranker.history)
    else:
        (tables / "ranker").mkdir(parents=True, exist_ok=True)
        np.save(tables / "ranker" / "user_features.npy", ranker.user_table)
        np.save(tables / "ranker" / "item_features.npy", ranker.item_table)
    return folder


def load_ranker(folder: str | Path) -> Ranker:
    """A Ranker from a folder `save_ranker` wrote (plain CPU model, eval mode)."""
    import torch

    from recsys.config import load_config
    from recsys.data.metadata import read_metadata
    from recsys.models.task import build_task
    from recsys.retrieval.candidates import LABEL_MODE, load_tables
    from recsys.retrieval.rank import Ranker

    folder = Path(folder)
    cfg, meta = load_config(folder / CONFIG_FILE), read_metadata(folder)
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    task = build_task(cfg, meta, ebc_device="cpu", training=False)
    task.load_state_dict(state, strict=True)
    users, items = (json.loads((folder / f).read_text()) for f in (USERS_FILE, ITEMS_FILE))
    tables = folder / TABLES_SUBDIR
    if meta.label.get("mode") == LABEL_MODE:
        user_table, item_table, history = load_tables(tables)
    else:
        user_table, item_table = (np.load(tables / "ranker" / f"{s}_features.npy") for s in ("user", "item"))
        history = None
    rows = [{raw: r for r, raw in enumerate(v) if r > 0} for v in (users, items)]
    return Ranker("served", cfg, meta, task.eval(), rows[0], rows[1], user_table, item_table, history)


# ------------------------------------------------------------------------------------------ serving
@dataclass
class TwoStageState:
    """The retrieval model's state, the ranker and N, loaded once."""

    retrieval: ServingState
    ranker: Ranker
    candidates: int


def load_two_stage(artifacts: dict[str, str]) -> TwoStageState:
    """Read the artifacts `build_two_stage` logs (paths by artifact name)."""
    from recsys.retrieval.serve import load_state, set_torch_threads

    set_torch_threads()
    settings = json.loads(Path(artifacts[SETTINGS_ART]).read_text())
    return TwoStageState(
        load_state(artifacts), load_ranker(artifacts[RANKER_ART]), int(settings["candidates"])
    )


def _rounds(users: list[str]) -> np.ndarray:
    """Per row, how many earlier rows have the same user id: rows of one round have distinct users
    (the batch functions group a table's rows by user id)."""
    seen: dict[str, int] = {}
    out = np.zeros(len(users), np.int64)
    for j, u in enumerate(users):
        out[j] = seen.get(u, 0)
        seen[u] = out[j] + 1
    return out


def _candidate_table(users: list[str], retrieved: pd.DataFrame) -> Any:
    """The retrieved lists as the (user, rank, item, score, fallback) table `recommend` returns."""
    import pyarrow as pa

    sizes = np.array([len(x) for x in retrieved["items"]], np.int64)
    flat = [i for x in retrieved["items"] for i in x]
    return pa.table(
        {
            "user": pa.array(np.repeat(np.asarray(users, dtype=object), sizes).tolist(), pa.string()),
            "rank": pa.array(np.concatenate([np.arange(1, n + 1) for n in sizes] or [[]]).astype(np.int32)),
            "item": pa.array(flat, pa.string()),
            # float32 like the search's scores (answer widened them to Python floats for the JSON answer)
            "score": pa.array(
                np.concatenate([np.asarray(x, np.float32) for x in retrieved["scores"]] or [[]])
            ),
            "fallback": pa.array(np.repeat(retrieved["fallback"].to_numpy(bool), sizes)),
        }
    )


def answer_two_stage(
    state: TwoStageState, users: list[str], ks: np.ndarray, histories: list[list[str] | None] | None = None
) -> pd.DataFrame:
    """One row per request: user_id, items, scores (ranker probability; train count for a fallback),
    fallback, retrieval_ranks (and unknown_items with histories)."""
    from recsys.retrieval.rank import rerank, score_table
    from recsys.retrieval.serve import answer

    depth = np.maximum(ks, state.candidates)
    retrieved = answer(state.retrieval, users, depth, histories)
    items_of, scores_of = list(retrieved["items"]), list(retrieved["scores"])
    ranks_of: list[Any] = [None] * len(users)
    rounds = _rounds(users)
    for r in range(int(rounds.max(initial=-1)) + 1):
        rows = np.flatnonzero(rounds == r)
        part = retrieved.iloc[rows].reset_index(drop=True)
        table = _candidate_table([users[j] for j in rows], part)
        ranked = rerank(table, score_table(table, state.ranker), int(ks[rows].max()))
        at = np.r_[0, np.cumsum(np.bincount(_user_codes(ranked), minlength=len(rows)))]
        items, scores = ranked.column("item").to_pylist(), ranked.column("score").to_numpy()
        ret_rank = ranked.column("retrieval_rank").to_numpy()
        for n, j in enumerate(rows):  # rerank keeps the users in the table's (= the rows') order
            s = slice(at[n], at[n] + min(int(ks[j]), at[n + 1] - at[n]))
            items_of[j], scores_of[j] = items[s], scores[s].astype(float).tolist()
            ranks_of[j] = ret_rank[s].astype(int).tolist()
    return retrieved.assign(items=items_of, scores=scores_of, retrieval_ranks=ranks_of)


def _user_codes(table: Any) -> np.ndarray:
    """Each row's user as 0, 1, … in first-seen order."""
    import pyarrow.compute as pc

    return pc.dictionary_encode(table.column("user").combine_chunks()).indices.to_numpy()


# --------------------------------------------------------------------------------------------- build
def default_candidates(ranker: Ranker, tags: dict[str, str]) -> int:
    """N for a ranker: the funnel bench's val choice (run tag), else its candidates' top_n, else the default."""
    if CANDIDATES_TAG in tags:
        return int(tags[CANDIDATES_TAG])
    return int(ranker.meta.label.get("top_n") or DEFAULT_CANDIDATES)


def signature() -> Any:
    """The retrieval model's signature with the ranked lists' retrieval ranks added to the output."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    from recsys.retrieval.serve import signature as retrieval_signature

    base = retrieval_signature()
    outputs = Schema([*base.outputs.inputs, ColSpec(Array("long"), "retrieval_ranks")])
    return ModelSignature(inputs=base.inputs, outputs=outputs)


def build_two_stage(
    run_id: str,
    ranker_run_id: str,
    uri: str | None = None,
    register: str | None = None,
    candidates: int | None = None,
    ranker_overrides: list[str] | None = None,
) -> BuiltModel:
    """Log the two-stage model of Two-Tower run `run_id` and ranking run `ranker_run_id` into the
    Two-Tower run; register it as `register` (default `recsys-<config name>-two-stage`; '' = do not)."""

    from recsys.data.metadata import read_metadata
    from recsys.retrieval.rank import check_vocab, open_ranker
    from recsys.retrieval.serve import log_served_model, write_artifacts

    with tempfile.TemporaryDirectory() as tmp:
        artifacts, run = write_artifacts(run_id, uri, Path(tmp) / "artifacts")
        ranker = open_ranker(ranker_run_id, run.tracking_uri, ranker_overrides)
        prepared = run.cfg.data.prepared_dir
        check_vocab(ranker, run.run_id, prepared, read_metadata(prepared))
        n = candidates or default_candidates(ranker, run.client().get_run(ranker_run_id).data.tags)
        if n < 1:
            raise UserError(f"--candidates {n}: must be >= 1 (items retrieved per request for the ranker)")
        artifacts[RANKER_ART] = str(save_ranker(ranker, Path(tmp) / "artifacts" / RANKER_ART))
        settings = Path(tmp) / "artifacts" / SETTINGS_ART
        settings.write_text(json.dumps({"candidates": n, "ranker_run_id": ranker_run_id}) + "\n")
        artifacts[SETTINGS_ART] = str(settings)
        name = f"recsys-{run.cfg.name}-two-stage" if register is None else register or None
        return log_served_model(
            run, MODEL_NAME, MODEL_CODE, artifacts, Path(tmp), True, signature(), name,
            tags={"two_stage.ranker_run_id": ranker_run_id},
        )  # fmt: skip

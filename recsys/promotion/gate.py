"""`recsys promote`: the gate between a newly trained run and what is served.

The candidate run and the current champion (the registered version with alias `champion`) are scored
on the same new window, which neither trained on (`window_eval`). The candidate is registered as a new
version of the model (Two-Tower: its FAISS index is built and logged, then the served pyfunc version
is built from it, as `recsys index build` + `recsys serve build --register` do; DLRM: its logged
model) and gets alias `challenger`. It is promoted iff candidate ≥ champion − margin, or when there is
no champion yet: then `champion` moves to its version and the old champion keeps alias `previous`.
The decision, both figures and the margin are logged to the candidate run (metrics `promotion/*`, the
file `promotion/decision.json`), and one line is printed. Exit status: 0 promoted, `REFUSED_EXIT`
refused, 2 bad input.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from recsys.errors import UserError
from recsys.promotion.registry import CHAMPION, RegisteredVersion, move_aliases, version_by_alias
from recsys.promotion.window_eval import (
    LoggedRun,
    check_unseen,
    default_metric,
    open_logged_run,
    open_window,
    score,
)

#: Exit status of `recsys promote` when the gate refuses the candidate (2 is bad input, 0 promoted).
REFUSED_EXIT = 3


@dataclass
class Decision:
    """What the gate decided, on which figures; logged as promotion/decision.json."""

    promoted: bool
    model_name: str
    metric: str
    margin: float
    window: str
    split: str
    candidate_run: str
    candidate: float
    version: str  # the candidate's registered version (alias challenger; champion when promoted)
    champion_run: str | None  # None: there was no champion
    champion: float | None
    champion_version: str | None

    def line(self) -> str:
        """One line for the terminal and the pipeline log."""
        verdict = "PROMOTED" if self.promoted else "REFUSED"
        if self.champion is None:
            why = "no champion yet"
        else:
            rel = ">=" if self.promoted else "<"
            why = (
                f"candidate {self.metric} {self.candidate:.5f} {rel} champion {self.champion:.5f} "
                f"(version {self.champion_version}) - margin {self.margin:g}"
            )
        where = f"{self.model_name} version {self.version}"
        alias = "@champion" if self.promoted else "@challenger"
        return (
            f"{verdict} run {self.candidate_run} as {where} ({alias}): {why}; on {self.window} {self.split}"
        )


def _register(run: LoggedRun, name: str, tracking_uri: str) -> str:
    """Build what serves the candidate and register it as a new version of `name`; its version."""
    if run.cfg.model.kind == "two_tower":
        from recsys.retrieval.index import IndexParams, build_run_index
        from recsys.retrieval.serve import build_model

        build_run_index(run.run_id, tracking_uri, IndexParams(kind=run.cfg.promotion.index_kind))
        built = build_model(run.run_id, tracking_uri, register=name)
        assert built.version is not None
        return built.version
    return _register_logged_model(run.run_id, name, tracking_uri)


def _register_logged_model(run_id: str, name: str, tracking_uri: str) -> str:
    """Register the model `recsys train` logged in run `run_id` (name `model`) as a version of `name`."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    exp = client.get_run(run_id).info.experiment_id
    found = [
        m
        for m in client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
        if m.name == "model"
    ]
    if not found:
        raise UserError(f"run {run_id} has no logged model 'model' (trained with tracking.log_model=false?)")
    mlflow.set_tracking_uri(tracking_uri)
    return str(mlflow.register_model(f"models:/{found[0].model_id}", name).version)


def _log(client: Any, d: Decision) -> None:
    """Both figures, the margin and the decision as metrics and a JSON file of the candidate run."""
    metrics = {
        "promotion/promoted": float(d.promoted),
        "promotion/margin": d.margin,
        "promotion/candidate": d.candidate,
    }
    if d.champion is not None:
        metrics["promotion/champion"] = d.champion
    for k, v in metrics.items():
        client.log_metric(d.candidate_run, k, v)
    client.log_dict(d.candidate_run, asdict(d), "promotion/decision.json")


def promote(
    candidate_run: str,
    window_dir: str | Path,
    tracking_uri: str | None = None,
    model_name: str | None = None,
    margin: float | None = None,
    metric: str | None = None,
) -> Decision:
    """Gate run `candidate_run` against the champion on `window_dir`; move the aliases; log the decision.

    `model_name`, `margin` and `metric` default to the candidate's config (`promotion.*`).
    """
    import mlflow

    from recsys.retrieval.runs import tracking_uri as resolve_uri

    uri = resolve_uri(tracking_uri)
    client = mlflow.MlflowClient(uri)
    with tempfile.TemporaryDirectory(prefix="recsys-promote-") as tmp:
        cand = open_logged_run(candidate_run, uri, Path(tmp))
        p = cand.cfg.promotion
        name = model_name or p.model_name or f"recsys-{cand.cfg.name}"
        margin = p.margin if margin is None else margin
        if margin < 0 or math.isnan(margin):
            raise UserError(f"--margin {margin}: must be >= 0 (how much worse than the champion is allowed)")
        metric = metric or default_metric(cand.cfg)
        window = open_window(window_dir)
        check_unseen(cand, window)
        old = version_by_alias(client, name, CHAMPION)
        champ = _champion_run(old, cand, uri, Path(tmp))
        if champ is not None:
            check_unseen(champ, window)
        cand_score = score(cand, window, metric, p.split)[metric]
        champ_score = None if champ is None else score(champ, window, metric, p.split)[metric]
        promoted = champ_score is None or cand_score >= champ_score - margin
        version = _register(cand, name, uri)
        move_aliases(client, name, version, old, promoted)
    d = Decision(
        promoted, name, metric, margin, str(window_dir), p.split, candidate_run, cand_score, version,
        None if champ is None else champ.run_id, champ_score, None if old is None else old.version,
    )  # fmt: skip
    _log(client, d)
    return d


def _champion_run(old: RegisteredVersion | None, cand: LoggedRun, uri: str, tmp: Path) -> LoggedRun | None:
    """The champion's training run, checked to be comparable with the candidate (None: no champion)."""
    if old is None:
        return None
    if old.run_id == cand.run_id:
        raise UserError(f"run {cand.run_id} is already the champion (version {old.version}); nothing to gate")
    if not old.run_id:
        raise UserError(f"{old.name}@champion: version {old.version} was not logged from a run")
    champ = open_logged_run(old.run_id, uri, tmp)
    if champ.cfg.model.kind != cand.cfg.model.kind:
        raise UserError(
            f"{old.name}@champion is a {champ.cfg.model.kind} run, the candidate a {cand.cfg.model.kind}: "
            "gate runs of one model kind"
        )
    return champ

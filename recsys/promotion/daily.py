"""One turn of the continuous-training loop, as library calls the pipeline steps and `recsys daily`
(the Kubernetes CronJob's command) share:

    prepare the newest window → warm-start train on the window before it → gate on the newest
    (promote: index + served version) → recommend with the champion.

Windows are days: the window of a run ending at `until` (a date, or the schedule time a recurring run
passes, truncated to its day) is [until − days, until), prepared under `<data_root>/windows/
<since>_<until>` with its vocabularies extending the window before it (`data.window.previous`). The
candidate trains on the window before the newest (prepared by the previous turn) and is gated on the
newest, which neither it nor the champion trained on. The state lives where it already is: prepared
windows on the data volume, the champion in the MLflow Model Registry (alias `champion`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from recsys.errors import UserError

WINDOWS_DIR = "windows"


@dataclass(frozen=True)
class WindowPlan:
    """The newest window of this turn and the one before it (previous '' when not prepared yet)."""

    since: str
    until: str
    path: str
    previous: str


def _day(value: str) -> dt.date:
    """A date from 'YYYY-MM-DD' or an ISO timestamp such as KFP's schedule time (2026-12-07T03:00:00Z)."""
    try:
        return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).date()
    except ValueError:
        raise UserError(f"until {value!r}: expected a date YYYY-MM-DD or an ISO timestamp") from None


def window_path(data_root: str, since: dt.date, until: dt.date) -> str:
    """Folder of the window [since, until) under data_root."""
    return f"{data_root.rstrip('/')}/{WINDOWS_DIR}/{since.isoformat()}_{until.isoformat()}"


def plan_window(data_root: str, until: str, days: int = 1) -> WindowPlan:
    """The window ending at `until` (`days` long) and its predecessor when that one is prepared."""
    if days < 1:
        raise UserError(f"window days {days}: must be >= 1")
    end = _day(until)
    start = end - dt.timedelta(days=days)
    before = window_path(data_root, start - dt.timedelta(days=days), start)
    previous = before if (Path(before) / "metadata.json").is_file() else ""
    return WindowPlan(start.isoformat(), end.isoformat(), window_path(data_root, start, end), previous)


def window_overrides(plan: WindowPlan) -> list[str]:
    """Config overrides that prepare `plan`'s newest window (data.window.*, issue 18's window fields)."""
    sets = [
        f"data.prepared_dir={plan.path}",
        f"data.window.since={plan.since}",
        f"data.window.until={plan.until}",
    ]
    return [*sets, f"data.window.previous={plan.previous}"] if plan.previous else sets


def prepare_window(config: str, overrides: list[str], plan: WindowPlan) -> str:
    """Prepare the newest window (kept when a retried turn finds it complete); its folder."""
    from recsys.config import load_config
    from recsys.data.prepare import prepare

    if (Path(plan.path) / "metadata.json").is_file():
        return plan.path
    prepare(load_config(config, [*overrides, *window_overrides(plan)]), overwrite=False)
    return plan.path


def champion_run(model_name: str, tracking_uri: str) -> str:
    """The training run of `model_name@champion`; '' when nothing was promoted yet."""
    import mlflow

    from recsys.promotion.registry import CHAMPION, version_by_alias

    version = version_by_alias(mlflow.MlflowClient(tracking_uri), model_name, CHAMPION)
    return (version.run_id or "") if version is not None else ""


def warm_start_overrides(champion: str) -> list[str]:
    """Train from the champion's weights when there is one (train.init_from, issue 18's warm start)."""
    return [f"train.init_from={champion}"] if champion else []


def check_previous(previous: str, window: str) -> None:
    """A turn trains on the window before the newest: say what to do when it does not exist."""
    if not previous:
        raise UserError(
            f"no prepared window before {window}: the first turn has nothing to train on; the next turn "
            "trains on this one (or prepare the window before it once with `recsys data prepare`)"
        )


@dataclass
class Turn:
    """What one turn did: the window, the trained run, the gate's decision, the recommendations."""

    plan: WindowPlan
    run_id: str = ""
    promoted: bool | None = None
    line: str = ""
    recommendations: str = ""


def run_turn(
    config: str,
    overrides: list[str],
    backend: str,
    data_root: str,
    until: str,
    days: int = 1,
    model_name: str | None = None,
    k: int = 100,
) -> Turn:
    """One turn of the loop, in this process (the CronJob's `recsys daily`); training goes through the
    launcher contract, so `backend` pytorchjob/trainjob submits a job and follows it, local runs torchrun."""
    from recsys.config import load_config
    from recsys.launch.steps import recommend_step, recommendations_path, train_step, unique_job_name
    from recsys.promotion.gate import promote
    from recsys.tracking import resolve_tracking_uri

    plan = plan_window(data_root, until, days)
    prepare_window(config, overrides, plan)
    if not plan.previous:
        return Turn(plan, line=f"first window {plan.path} prepared; the next turn trains on it")
    base = load_config(config, overrides)
    uri = resolve_tracking_uri(base)
    name = model_name or base.promotion.model_name or f"recsys-{base.name}"
    champion = champion_run(name, uri)
    job = unique_job_name(base.job.name, f"daily-{plan.until}", "train")
    sets = [f"data.prepared_dir={plan.previous}", f"job.name={job}", *warm_start_overrides(champion)]
    run_id = train_step(load_config(config, [*overrides, *sets]), backend).run_id or ""
    decision = promote(run_id, plan.path, uri, name)
    served = run_id if decision.promoted else (decision.champion_run or run_id)
    recs = ""
    if base.model.kind == "two_tower":
        recs = recommend_step(served, uri, k, recommendations_path(plan.path, served, k))["path"]
    return Turn(plan, run_id, decision.promoted, decision.line(), recs)

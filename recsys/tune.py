"""`recsys tune`: Optuna search over config fields, or a Katib Experiment rendered from the same space.

A search space YAML maps dotted config fields to distributions; every field is checked against the
config at load time by applying a sample value. In-process tuning runs each trial as one
`recsys.train.train(...)` (world size 1) with its own checkpoint folder, as an MLflow child run of one
parent run; the objective is read from the trial's validations only (never test), intermediate
validation values go to Optuna's MedianPruner, and a pruned trial stops at that validation. A trial
that raises (an invalid sampled config, a training error) is recorded as failed (Optuna FAIL, its
child run FAILED, the error as a tag of the parent) and the study goes on.

optuna and kubeflow-katib are imported inside functions: `import recsys.tune` stays light.
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from recsys.config import Config, ConfigError, Strict, apply_override, config_from_dict, dump_config
from recsys.errors import UserError

if TYPE_CHECKING:
    import optuna

#: Tag of a trial's child run: its Optuna trial number.
TRIAL_TAG = "recsys.tune.trial"
#: Tag of a child run: complete, pruned or failed.
STATE_TAG = "recsys.tune.state"


# ---------------------------------------------------------------------------------------- the space
class FloatParam(Strict):
    """A float in [low, high], uniform or log-uniform."""

    type: Literal["float"] = Field(description="Distribution selector.")
    low: float = Field(description="Lowest value (inclusive).")
    high: float = Field(description="Highest value (inclusive).")
    log: bool = Field(False, description="Sample log-uniformly (low must be > 0).")
    step: float | None = Field(None, gt=0, description="Discretisation step (not with log).")

    @model_validator(mode="after")
    def _check(self) -> FloatParam:
        _check_range(self.low, self.high, self.log, self.step)
        return self


class IntParam(Strict):
    """An integer in [low, high]."""

    type: Literal["int"] = Field(description="Distribution selector.")
    low: int = Field(description="Lowest value (inclusive).")
    high: int = Field(description="Highest value (inclusive).")
    log: bool = Field(False, description="Sample log-uniformly (low must be > 0).")
    step: int = Field(1, ge=1, description="Step between values (1 with log).")

    @model_validator(mode="after")
    def _check(self) -> IntParam:
        _check_range(self.low, self.high, self.log, None if self.step == 1 else self.step)
        return self


class CategoricalParam(Strict):
    """One of a list of values."""

    type: Literal["categorical"] = Field(description="Distribution selector.")
    choices: list[bool | int | float | str] = Field(min_length=1, description="The values to choose from.")


def _check_range(low: float, high: float, log: bool, step: float | None) -> None:
    if low > high:
        raise ValueError(f"low ({low}) must not exceed high ({high})")
    if log and low <= 0:
        raise ValueError(f"log: low ({low}) must be > 0")
    if log and step is not None:
        raise ValueError("log and step do not go together")


Param = Annotated[FloatParam | IntParam | CategoricalParam, Field(discriminator="type")]


class SearchSpace(Strict):
    """What `recsys tune` searches: the objective metric and a distribution per dotted config field."""

    metric: str | None = Field(
        None,
        description="Validation metric to optimise, e.g. val/ndcg@10; None: train.early_stopping.metric, "
        "else val/loss.",
    )
    mode: Literal["auto", "max", "min"] = Field(
        "auto", description="max or min; auto: min for losses, else max."
    )
    params: dict[str, Param] = Field(
        min_length=1, description="Dotted config field (as in --set) → its distribution."
    )


@dataclass(frozen=True)
class Space:
    """A loaded search space resolved against one config: metric, direction and distributions."""

    metric: str
    mode: Literal["max", "min"]
    params: dict[str, FloatParam | IntParam | CategoricalParam]
    origin: str


def _samples(p: FloatParam | IntParam | CategoricalParam) -> list[Any]:
    """Values whose acceptance by the config shows that the field takes this distribution."""
    if isinstance(p, CategoricalParam):
        return list(p.choices)
    return [p.low, p.high]


def load_space(path: str | Path, cfg: Config) -> Space:
    """Read and strictly validate a space YAML against `cfg`; errors name the file and the field."""
    origin = str(path)
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UserError(f"{origin}: cannot read the search space ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UserError(f"{origin}: not valid YAML: {e}") from None
    try:
        space = SearchSpace.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{origin}: {_space_errors(e)}") from None
    base = cfg.model_dump(mode="json")
    for name, param in space.params.items():
        for value in _samples(param):
            data = json.loads(json.dumps(base))
            try:
                apply_override(data, _assignment(name, value))
                config_from_dict(data, origin)
            except ConfigError as e:
                reason = str(e).splitlines()[0].split(": ", 2)[-1]
                raise UserError(f"{origin}: params.{name}: not a settable config field ({reason})") from None
    metric = space.metric or cfg.train.early_stopping.metric or "val/loss"
    if metric not in cfg.validation_metrics():
        raise UserError(
            f"{origin}: metric: {metric!r} is not a validation metric of this config; "
            f"choose one of {cfg.validation_metrics()}"
        )
    mode = space.mode if space.mode != "auto" else ("min" if metric.endswith("loss") else "max")
    return Space(metric, mode, dict(space.params), origin)


def _space_errors(err: ValidationError) -> str:
    """Every problem of a space file on one line, each naming its dotted path."""
    parts = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"] if p not in ("float", "int", "categorical"))
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{where or '<root>'}: {msg}")
    return "; ".join(parts)


def _assignment(name: str, value: Any) -> str:
    """A `--set` assignment whose value parses back exactly (JSON is YAML for strings, ints, booleans)."""
    if isinstance(value, float):
        # PyYAML (YAML 1.1) reads 1e-07 as a string: it wants a dot in the mantissa. Tag it instead.
        return f"{name}=!!float {value!r}"
    return f"{name}={json.dumps(value)}"


def trial_config(cfg: Config, values: dict[str, Any], extra: list[str] | None = None) -> Config:
    """`cfg` with a trial's values (and `extra` overrides) applied and validated."""
    data = cfg.model_dump(mode="json")
    for name, value in values.items():
        apply_override(data, _assignment(name, value))
    for assignment in extra or []:
        apply_override(data, assignment)
    return config_from_dict(data, f"{cfg.name} (trial values)")


def suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    """Ask Optuna for one value per field of the space."""
    values: dict[str, Any] = {}
    for name, p in space.params.items():
        if isinstance(p, FloatParam):
            values[name] = trial.suggest_float(name, p.low, p.high, log=p.log, step=p.step)
        elif isinstance(p, IntParam):
            values[name] = trial.suggest_int(name, p.low, p.high, log=p.log, step=p.step)
        else:
            values[name] = trial.suggest_categorical(name, p.choices)
    return values


# ------------------------------------------------------------------------------------- in-process
@dataclass
class TuneResult:
    """What a tuning run found: the parent run, the best trial and its config, and every trial."""

    parent_run_id: str | None
    metric: str
    best_trial: int
    best_value: float
    best_values: dict[str, Any]
    best_config: Config
    trials: list[dict[str, Any]] = field(default_factory=list)


@contextlib.contextmanager
def _report_validations(trial: optuna.Trial, metric: str, reported: list[float]) -> Iterator[None]:
    """While a trial trains: report every validation's `metric` to Optuna (and `reported`); stop on a prune.

    The Trainer has no callback hook, so its validate() is wrapped for the trial's duration; the
    raised TrialPruned unwinds fit() like any error (the MLflow run ends, the process group is freed).
    """
    import optuna

    from recsys.trainer import Trainer

    original = Trainer.validate
    key = metric.removeprefix("val/")

    def validate(self: Trainer) -> dict[str, float]:
        m = original(self)
        value = float(m[key])
        reported.append(value)
        trial.report(value, step=self.step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"{metric} = {value:.5f} at step {self.step}")
        return m

    Trainer.validate = validate  # type: ignore[method-assign]
    try:
        yield
    finally:
        Trainer.validate = original  # type: ignore[method-assign]


def objective_value(result: Any, cfg: Config, metric: str) -> float:
    """A finished trial's value: `metric` at the validation of the state the run tested and exports.

    That is the best validation when early stopping restores the best state (train.early_stopping
    .restore_best on this metric), else the last one: the same number the results table prints,
    which Katib's collector reads (metrics_filter).
    """
    key = metric.removeprefix("val/")
    if key not in result.tested_validation:
        raise UserError(f"the trial validated no {metric}; tuning needs at least one validation")
    return float(result.tested_validation[key])


class _Parent:
    """The parent MLflow run of a study (created through the client: the trainer's run is the child)."""

    def __init__(self, cfg: Config, space: Space) -> None:
        from recsys.tracking import MlflowTracker, resolve_tracking_uri, run_tags

        self.enabled = cfg.tracking.enabled
        self.run_id: str | None = None
        if not self.enabled:
            return
        tracker = MlflowTracker(resolve_tracking_uri(cfg), cfg.tracking.experiment)
        self.client, self.experiment_id = tracker._client, tracker._experiment_id()
        name = f"{cfg.tracking.run_name or f'{cfg.name}-{cfg.model.kind}'}-tune"
        tags = {**run_tags(cfg, 1), "recsys.tune.metric": space.metric}
        self.run_id = self.client.create_run(self.experiment_id, run_name=name, tags=tags).info.run_id
        params = {
            f"space.{k}": json.dumps(v.model_dump(exclude_defaults=True)) for k, v in space.params.items()
        }
        for k, v in params.items():
            self.client.log_param(self.run_id, k, v[:6000])
        self.client.log_text(self.run_id, Path(space.origin).read_text(), "tune/space.yaml")

    def child_tags(self, number: int) -> dict[str, str]:
        """Tags that make a trial's training run a child of this run."""
        return {"mlflow.parentRunId": self.run_id or "", TRIAL_TAG: str(number)} if self.enabled else {}

    def child_run_id(self, number: int) -> str | None:
        """The run id of trial `number` (for trials that raised before returning it)."""
        if not self.enabled:
            return None
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self.run_id}' and tags.`{TRIAL_TAG}` = '{number}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def trial_done(
        self, number: int, state: str, metric: str, value: float | None, error: str | None = None
    ) -> None:
        """Record a trial on the parent (trial/<n>/<metric>, a failed one's error) and mark its child run."""
        from recsys.tracking import mlflow_metrics

        if not self.enabled:
            return
        if error is not None:
            self.client.set_tag(self.run_id, f"trial/{number}/error", error[:5000])
        child = self.child_run_id(number)
        if child is not None:
            self.client.set_tag(child, STATE_TAG, state)
            if state == "pruned":
                # The trainer ended it FAILED (an exception left its loop); it was stopped on purpose.
                self.client.set_terminated(child, "KILLED")
        self.client.set_tag(self.run_id, f"trial/{number}/state", state)
        if value is not None:
            for k, v in mlflow_metrics(f"trial/{number}", {metric: value}).items():
                self.client.log_metric(self.run_id, k, v, step=number)

    def finish(self, result: TuneResult | None, best_yaml: str | None) -> None:
        """Log the best trial and its config, and end the parent run (FAILED without a result)."""
        from recsys.tracking import mlflow_metrics

        if not self.enabled:
            return
        if result is not None and best_yaml is not None:
            for k, v in mlflow_metrics("best", {result.metric: result.best_value}).items():
                self.client.log_metric(self.run_id, k, v)
            for k, v in result.best_values.items():
                self.client.log_param(self.run_id, f"best.{k}", json.dumps(v))
            self.client.set_tag(self.run_id, "recsys.tune.best_trial", str(result.best_trial))
            self.client.log_text(self.run_id, best_yaml, "tune/best.yaml")
        self.client.set_terminated(self.run_id, "FINISHED" if result is not None else "FAILED")


def _run_trial(
    trial: optuna.Trial, cfg: Config, space: Space, workdir: Path, parent: _Parent, reported: list[float]
) -> tuple[float, dict[str, Any]]:
    """Train one trial in-process; returns (objective value, the trial's values)."""
    from recsys.train import train

    values = suggest(trial, space)
    name = cfg.tracking.run_name or f"{cfg.name}-{cfg.model.kind}"
    extra = [
        f"train.checkpoint.dir={json.dumps(str(workdir / f'trial-{trial.number}'))}",
        f"tracking.run_name={json.dumps(f'{name}-trial-{trial.number}')}",
    ]
    tcfg = trial_config(cfg, values, extra)
    print(f"recsys tune: trial {trial.number}: {values}", file=sys.stderr, flush=True)
    with _report_validations(trial, space.metric, reported):
        result = train(tcfg, resume="never", extra_tags=parent.child_tags(trial.number))
    return objective_value(result, tcfg, space.metric), values


def tune(
    cfg: Config,
    space: Space,
    trials: int,
    workdir: str | Path,
    seed: int = 0,
    prune_startup_trials: int = 2,
    prune: bool = True,
    enqueue: list[dict[str, Any]] | None = None,
) -> TuneResult:
    """Search `space` with Optuna's seeded TPE over `trials` in-process trainings of `cfg`.

    `enqueue`: values (field → value) tried first, in order, before the sampler proposes any
    (e.g. the config's own values as a baseline)."""
    import optuna

    workdir = Path(workdir)
    pruner = (
        optuna.pruners.MedianPruner(n_startup_trials=prune_startup_trials, n_warmup_steps=0)
        if prune
        else optuna.pruners.NopPruner()
    )
    direction = "maximize" if space.mode == "max" else "minimize"
    study = optuna.create_study(
        direction=direction, sampler=optuna.samplers.TPESampler(seed=seed), pruner=pruner
    )
    for values in enqueue or []:
        study.enqueue_trial(values)
    parent = _Parent(cfg, space)
    records: list[dict[str, Any]] = []

    def objective(trial: optuna.Trial) -> float:
        reported: list[float] = []
        try:
            value, values = _run_trial(trial, cfg, space, workdir, parent, reported)
        except optuna.TrialPruned:
            last = reported[-1] if reported else None
            parent.trial_done(trial.number, "pruned", space.metric, last)
            records.append({"number": trial.number, "state": "pruned", "value": last, "steps": len(reported)})
            raise
        except Exception as e:
            # Optuna records it as FAIL (catch= below) and the study goes on with the next trial.
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            parent.trial_done(trial.number, "failed", space.metric, None, error)
            records.append(
                {"number": trial.number, "state": "failed", "error": error, "values": trial.params}
            )
            print(f"recsys tune: trial {trial.number} failed: {error}", file=sys.stderr, flush=True)
            raise
        except BaseException:  # KeyboardInterrupt, SystemExit: the study stops
            parent.trial_done(trial.number, "failed", space.metric, None)
            raise
        parent.trial_done(trial.number, "complete", space.metric, value)
        records.append({"number": trial.number, "state": "complete", "value": value, "values": values})
        return value

    result: TuneResult | None = None
    try:
        study.optimize(objective, n_trials=trials, catch=(Exception,))
        result = _result(cfg, space, study, parent, records)
        return result
    finally:
        parent.finish(result, dump_config(result.best_config) if result else None)


def _result(
    cfg: Config, space: Space, study: optuna.Study, parent: _Parent, records: list[dict[str, Any]]
) -> TuneResult:
    import optuna

    by_number = {t.number: t.state.name for t in study.trials}
    for record in records:
        record["optuna_state"] = by_number.get(record["number"])
    if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        failed = [r for r in records if r["state"] == "failed"]
        why = f"; first failure: trial {failed[0]['number']}: {failed[0]['error']}" if failed else ""
        raise UserError(
            f"recsys tune: none of the {len(study.trials)} trials completed "
            f"({len(failed)} failed, the others pruned){why}"
        )
    best = study.best_trial
    # The base config with the best values: its checkpoint folder and run name are the config's own,
    # not the trial's, so `recsys train --config best.yaml` starts a fresh run of its own.
    return TuneResult(
        parent_run_id=parent.run_id,
        metric=space.metric,
        best_trial=best.number,
        best_value=float(best.value),
        best_values=dict(best.params),
        best_config=trial_config(cfg, dict(best.params)),
        trials=records,
    )


# ------------------------------------------------------------------------------------------- Katib
KATIB_API = "kubeflow.org/v1beta1"
# Katib judges a PyTorchJob trial by the training operator's conditions, and injects its metrics
# collector into the Master pod (rank 0 prints the results table).
PYTORCHJOB_SUCCESS = 'status.conditions.#(type=="Succeeded")#|#(status=="True")#'
PYTORCHJOB_FAILURE = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
MASTER_LABELS = {"training.kubeflow.org/job-role": "master"}
TRIAL_NAME_PARAM = "trialName"


def katib_name(field_name: str) -> str:
    """The Katib parameter name of a dotted config field (letters, digits and '_')."""
    return re.sub(r"[^A-Za-z0-9]", "_", field_name)


def katib_metric(metric: str) -> str:
    """The metric as the trainer's results table (and so Katib's collector) names it: ndcg@10, loss."""
    return metric.removeprefix("val/")


def metrics_filter(metric: str) -> str:
    """StdOut collector regex (2 groups: name, value) for the row of `metric` in `format_results`'s
    table, whose first number is the validation of the tested state (the next column is test): the
    value `recsys tune` optimises (objective_value)."""
    return rf"^({re.escape(katib_metric(metric))})\s+([-+]?[0-9]+\.[0-9]+)"


def _katib_parameter(name: str, p: FloatParam | IntParam | CategoricalParam) -> dict[str, Any]:
    if isinstance(p, CategoricalParam):
        return {
            "name": katib_name(name),
            "parameterType": "categorical",
            "feasibleSpace": {"list": [json.dumps(c) if not isinstance(c, str) else c for c in p.choices]},
        }
    space: dict[str, Any] = {"min": str(p.low), "max": str(p.high)}
    if p.step is not None and not (isinstance(p, IntParam) and p.step == 1):
        space["step"] = str(p.step)
    space["distribution"] = "logUniform" if p.log else "uniform"
    kind = "double" if isinstance(p, FloatParam) else "int"
    return {"name": katib_name(name), "parameterType": kind, "feasibleSpace": space}


def katib_objects(
    cfg: Config, space: Space, trials: int, parallel: int, seed: int = 0
) -> list[dict[str, Any]]:
    """The ConfigMap of the resolved config and a Katib Experiment whose trials are its PyTorchJob."""
    import dataclasses

    from recsys.launch.jobspec import CHECKPOINT_MOUNT, job_spec
    from recsys.launch.kube import PYTORCHJOB_CONTAINER, config_map, pytorchjob

    names = {f: katib_name(f) for f in space.params}
    if len(set(names.values())) != len(names) or TRIAL_NAME_PARAM in names.values():
        raise UserError(f"{space.origin}: params: field names collide as Katib parameter names: {names}")
    spec = job_spec(cfg)
    # Each trial checkpoints in a folder of its own, so a restarted trial pod resumes only itself.
    ckpt = f"{CHECKPOINT_MOUNT}/{cfg.job.name}/${{trialParameters.{TRIAL_NAME_PARAM}}}"
    command = [*spec.command, "--set", f"train.checkpoint.dir={ckpt}"]
    for f, n in names.items():
        # Katib substitutes doubles as Python prints them (1e-05), which YAML 1.1 reads as a string.
        tag = "!!float " if isinstance(space.params[f], FloatParam) else ""
        command += ["--set", f"{f}={tag}${{trialParameters.{n}}}"]
    job = pytorchjob(dataclasses.replace(spec, command=command))
    job["metadata"] = {"labels": dict(spec.labels)}  # Katib names each trial's job after the trial
    trial_parameters = [
        {"name": TRIAL_NAME_PARAM, "description": "Katib trial name", "reference": "${trialSpec.Name}"}
    ]
    trial_parameters += [
        {"name": n, "description": f"config field {f}", "reference": n} for f, n in names.items()
    ]
    experiment = {
        "apiVersion": KATIB_API,
        "kind": "Experiment",
        "metadata": {
            "name": f"{cfg.job.name}-tune",
            "namespace": spec.namespace,
            "labels": dict(spec.labels),
        },
        "spec": {
            "objective": {
                "type": "maximize" if space.mode == "max" else "minimize",
                "objectiveMetricName": katib_metric(space.metric),
                # Katib's default takes the max (min) of every matching line; the one line printed is it.
                "metricStrategies": [{"name": katib_metric(space.metric), "value": "latest"}],
            },
            "algorithm": {
                "algorithmName": "tpe",
                "algorithmSettings": [{"name": "random_state", "value": str(seed)}],
            },
            "maxTrialCount": trials,
            "parallelTrialCount": parallel,
            "maxFailedTrialCount": max(1, trials // 2),
            "parameters": [_katib_parameter(f, p) for f, p in space.params.items()],
            "metricsCollectorSpec": {
                "collector": {"kind": "StdOut"},
                "source": {"filter": {"metricsFormat": [metrics_filter(space.metric)]}},
            },
            "trialTemplate": {
                "primaryContainerName": PYTORCHJOB_CONTAINER,
                "primaryPodLabels": dict(MASTER_LABELS),
                "successCondition": PYTORCHJOB_SUCCESS,
                "failureCondition": PYTORCHJOB_FAILURE,
                "trialParameters": trial_parameters,
                "trialSpec": job,
            },
        },
    }
    return [config_map(spec), experiment]


def render_katib(
    cfg: Config, space: Space, trials: int, parallel: int, generated_by: str, seed: int = 0
) -> str:
    """The Katib file: generated-by line, Apply/Check/Clean header, ConfigMap + Experiment (validated)."""
    from recsys.launch.kube import to_yaml
    from recsys.launch.kubeschema import validate_documents

    docs = katib_objects(cfg, space, trials, parallel, seed)
    validate_documents(docs, origin=f"Katib render of {cfg.name}")
    name, ns = docs[1]["metadata"]["name"], docs[1]["metadata"]["namespace"]
    lines = [
        f"# generated by {generated_by} — do not edit",
        f"# Katib Experiment (kubeflow.org/v1beta1) tuning {cfg.model.kind} from config {cfg.name!r}: "
        f"{trials} trial(s), {parallel} at a time, TPE on {katib_metric(space.metric)} ({space.mode}).",
        "# Each trial is the PyTorchJob of `recsys render --backend pytorchjob` with --set per parameter.",
        "# Needs Katib (with PyTorchJob in its trialResources), the Training Operator, and manifests/base.",
        "# Apply: kubectl apply -f <file>",
        f"# Check: kubectl -n {ns} get experiment {name} -w; kubectl -n {ns} get trials",
        "# Clean: kubectl delete -f <file>",
    ]
    return "\n".join(lines) + "\n---\n" + to_yaml(docs)


# --------------------------------------------------------------------------------------------- CLI
def main(args: Any) -> int:
    """`recsys tune` (argparse namespace from recsys.cli): run the search, or render Katib."""
    import shlex

    from recsys.config import load_config

    cfg = load_config(args.config, args.overrides)
    space = load_space(args.space, cfg)
    if args.render_katib:
        argv = [
            "recsys",
            "tune",
            "--config",
            args.config,
            "--space",
            args.space,
            "--trials",
            str(args.trials),
        ]
        argv += [a for o in args.overrides for a in ("--set", o)] + ["--render-katib"]
        text = render_katib(cfg, space, args.trials, args.parallel, shlex.join(argv), args.seed)
        _write(args.output, text)
        return 0
    workdir = args.workdir or str(Path("runs") / "tune" / cfg.name)
    result = tune(cfg, space, args.trials, workdir, args.seed, args.prune_startup, not args.no_prune)
    text = dump_config(result.best_config)
    _write(args.output, text)
    states = ", ".join(f"{t['number']}:{t['state']}" for t in result.trials)
    print(
        f"recsys tune: best trial {result.best_trial}: {result.metric} = {result.best_value:.5f} with "
        f"{result.best_values} (trials {states}; parent run {result.parent_run_id})",
        file=sys.stderr,
    )
    return 0


def _write(out: str, text: str) -> None:
    if out == "-":
        sys.stdout.write(text)
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)
    print(f"wrote {out}", file=sys.stderr)

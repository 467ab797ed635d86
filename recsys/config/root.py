"""The root `Config` (sections and the checks across them) and loading: strict YAML load by name or path,
`--set` overrides, resolved dump, differences, flatten for MLflow."""

from __future__ import annotations

import copy
import re
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, model_validator

from recsys.config.base import ConfigError, Strict
from recsys.config.data import DataConfig
from recsys.config.evaluation import EvalConfig
from recsys.config.job import JobConfig
from recsys.config.model import ModelConfig
from recsys.config.promotion import PromotionConfig
from recsys.config.tracking import TrackingConfig
from recsys.config.train import TrainConfig


class Config(Strict):
    """The whole resolved configuration of one recsys run."""

    name: str = Field(description="Name of this config (used in run names and job names).")
    data: DataConfig = Field(description="Data sources and preparation.")
    model: ModelConfig = Field(description="Model family and shape.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training loop.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    job: JobConfig = Field(default_factory=JobConfig, description="Job size and placement.")
    promotion: PromotionConfig = Field(
        default_factory=PromotionConfig, description="Gated promotion of a new run (`recsys promote`)."
    )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> Config:
        if self.train.batch_size % self.data.block_size:
            raise ValueError(
                f"train.batch_size ({self.train.batch_size}) must be a multiple of data.block_size "
                f"({self.data.block_size}): batches are whole MDS blocks so resume is exact"
            )
        if self.eval.batch_size % self.data.block_size:
            raise ValueError(
                f"eval.batch_size ({self.eval.batch_size}) must be a multiple of data.block_size ({self.data.block_size})"
            )
        if self.model.kind == "dlrm":
            if self.model.dlrm.dense_arch_layers[-1] != self.model.embedding_dim:
                raise ValueError(
                    f"model.dlrm.dense_arch_layers: last size {self.model.dlrm.dense_arch_layers[-1]} must equal "
                    f"model.embedding_dim {self.model.embedding_dim}"
                )
            if self.model.dlrm.over_arch_layers[-1] != 1:
                raise ValueError("model.dlrm.over_arch_layers: the last size must be 1 (one logit)")
        if self.train.sparse_optimizer.weight_decay:
            # TorchRec passes it to fbgemm with weight_decay_mode NONE, so it would be silently ignored.
            raise ValueError(
                "train.sparse_optimizer.weight_decay: the fused embedding optimizers do not apply weight "
                "decay (fbgemm's mode is NONE); set it to 0"
            )
        metric = self.train.early_stopping.metric
        if metric is not None and metric not in self.validation_metrics():
            raise ValueError(
                f"train.early_stopping.metric: {metric!r} is not a validation metric of model.kind "
                f"{self.model.kind!r}; choose one of {self.validation_metrics()}"
            )
        mc = [f for f, t in self.model.tables.items() if t.kind == "managed_collision"]
        if self.model.table_default.kind == "managed_collision":
            mc.insert(0, "table_default")
        if mc and self.model.kind != "dlrm":
            raise ValueError(
                f"model.tables: managed_collision ({', '.join(mc)}) is for model.kind dlrm only; the "
                "Two-Tower's retrieval maps rows through vocabularies (use exact or capped)"
            )
        self._check_history()
        if (self.data.split.mode == "presplit") != (self.data.source.kind == "presplit"):
            raise ValueError(
                "data.split.mode 'presplit' goes with data.source.kind 'presplit' and only with it"
            )
        return self

    def _check_history(self) -> None:
        """Models reading the `history` feature need it prepared and a plain (non-pipelined) loop."""
        m = self.model
        if m.kind == "sequential":
            who = "model.kind sequential"
            if self.data.history is not None and self.data.history.rule != "causal":
                raise ValueError(
                    "data.history.rule profile holds later items and leaves the row's own out: a next-item "
                    "model (model.kind sequential) needs data.history.rule causal"
                )
            if m.embedding_dim % m.sequential.heads:
                raise ValueError(
                    f"model.sequential.heads ({m.sequential.heads}) must divide model.embedding_dim "
                    f"({m.embedding_dim})"
                )
        elif m.kind == "two_tower" and m.two_tower.history_pooling != "none":
            who = f"model.two_tower.history_pooling {m.two_tower.history_pooling}"
        else:
            return
        if self.data.history is None:
            raise ValueError(f"{who} needs data.history (e.g. data.history.length: 50)")
        if self.train.pipeline:
            raise ValueError(f"{who} needs train.pipeline: false (the history lookup runs in a plain loop)")

    def validation_metrics(self) -> list[str]:
        """Names of the metrics each validation produces (what train.early_stopping.metric may name)."""
        if self.model.kind == "dlrm":
            return ["val/loss", "val/auc", "val/logloss", "val/calibration"]
        names = ["val/loss"]
        if self.eval.val_retrieval:
            names += [f"val/{m}@{k}" for m in ("recall", "ndcg", "hitrate") for k in self.eval.ks]
            names.append("val/auroc")
        return names

    def best_mode(self) -> str:
        """'max' or 'min' for train.early_stopping.metric (auto: min for losses, else max)."""
        mode = self.train.early_stopping.mode
        if mode != "auto":
            return mode
        return "min" if (self.train.early_stopping.metric or "").endswith("loss") else "max"


# ------------------------------------------------------------------------------------------ loading
def shipped_configs() -> list[str]:
    """Names of the configs shipped inside the package (recsys/configs/*.yaml)."""
    return sorted(
        p.name.removesuffix(".yaml")
        for p in resources.files("recsys.configs").iterdir()
        if p.name.endswith(".yaml")
    )


def _read_yaml(ref: str) -> tuple[dict[str, Any], str]:
    """Read a config by path or shipped name; returns (mapping, where it came from)."""
    path = Path(ref)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{ref}: config file not found (shipped names: {', '.join(shipped_configs())})")
        text, origin = path.read_text(), str(path)
    else:
        res = resources.files("recsys.configs").joinpath(f"{ref}.yaml")
        if not res.is_file():
            raise ConfigError(
                f"{ref}: no such config file or shipped config (shipped: {', '.join(shipped_configs())})"
            )
        text, origin = res.read_text(), f"recsys/configs/{ref}.yaml"
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: the top level must be a mapping, got {type(data).__name__}")
    return data, origin


_SCIENTIFIC = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (so 3, true, [1,2] work)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected dotted.path=value")
    dotted, raw = assignment.split("=", 1)
    keys = dotted.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in dotted path")
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML: {e}") from e
    if isinstance(value, str) and _SCIENTIFIC.fullmatch(value.strip()):
        value = float(value)  # YAML 1.1 reads 1e-5 (no dot) as a string; everyone means a number
    node = data
    for i, key in enumerate(keys[:-1]):
        child = node.get(key)
        if child is None:
            child = node[key] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(keys[: i + 1])} is not a section")
        node = child
    node[keys[-1]] = value


def _format_errors(err: ValidationError, origin: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not (isinstance(p, str) and p in _SOURCE_KINDS))
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see `recsys config schema`)"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg = f"{msg}, got {e['input']!r}"
        lines.append(f"{origin}: {loc or '<root>'}: {msg}")
    return "\n".join(lines)


_SOURCE_KINDS = {
    "synthetic_ctr",
    "synthetic_interactions",
    "movielens",
    "recbole",
    "learning_from_sets",
    "criteo",
    "table",
    "presplit",
}


def load_config(ref: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a config by shipped name or path, apply `--set` overrides, validate strictly."""
    data, origin = _read_yaml(str(ref))
    data = copy.deepcopy(data)
    for assignment in overrides or []:
        apply_override(data, assignment)
    return config_from_dict(data, origin)


def config_from_dict(data: dict[str, Any], origin: str = "<config>") -> Config:
    """Validate a plain mapping into a Config; errors name `origin` and the dotted path."""
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, origin)) from None


def dump_config(cfg: Config) -> str:
    """The resolved config as YAML (every default filled in), loadable by load_config."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def config_differences(
    saved: dict[str, Any], now: dict[str, Any], prefix: str = "", new_fields: bool = True
) -> list[str]:
    """Dotted `field: saved → now` lines where two nested config mappings differ.

    With new_fields=False, keys absent from `saved` (fields added since it was written) are skipped.
    """
    out: list[str] = []
    keys = set(saved) | set(now) if new_fields else set(saved)
    for key in sorted(keys):
        a, b = saved.get(key), now.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, where + ".", new_fields)
        elif a != b:
            out.append(f"{where}: {a!r} → {b!r}")
    return out


def flatten(cfg: Config) -> dict[str, str]:
    """The resolved config as dotted-key → string, for MLflow params."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = str(value)

    walk("", cfg.model_dump(mode="json"))
    return out

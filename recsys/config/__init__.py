"""The typed config tree: strict YAML load, `--set` overrides, resolved dump.

One resolved config flows from the CLI (or a launcher) to the trainer; nothing downstream re-derives
settings. Every field carries a one-line description; unknown keys and wrong types are errors that
name the dotted path. One module per section: `sources` (data.source), `data`, `model`, `train`,
`evaluation` (eval), `tracking`, `job`; `root` holds the `Config` and its loading; `base` what all share.
"""

from recsys.config.base import ConfigError, Strict
from recsys.config.data import DataConfig, LabelConfig, NegativesConfig, SplitConfig, WindowConfig
from recsys.config.evaluation import EvalConfig
from recsys.config.job import JobConfig, SparkAppConfig, Toleration
from recsys.config.model import DLRMConfig, ModelConfig, TableConfig, TwoTowerConfig
from recsys.config.promotion import PromotionConfig
from recsys.config.root import (
    Config,
    apply_override,
    config_differences,
    config_from_dict,
    dump_config,
    flatten,
    load_config,
    shipped_configs,
)
from recsys.config.sources import (
    CriteoSource,
    LearningFromSetsSource,
    MovieLensSource,
    PreSplitSource,
    RecBoleSource,
    Source,
    SyntheticCTRSource,
    SyntheticInteractionsSource,
    TableSource,
)
from recsys.config.tracking import TrackingConfig
from recsys.config.train import (
    CheckpointConfig,
    EarlyStoppingConfig,
    OptimizerConfig,
    ShardingConfig,
    TrainConfig,
)

__all__ = [
    "PromotionConfig",
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "CriteoSource",
    "DLRMConfig",
    "DataConfig",
    "EarlyStoppingConfig",
    "EvalConfig",
    "JobConfig",
    "LabelConfig",
    "LearningFromSetsSource",
    "ModelConfig",
    "MovieLensSource",
    "NegativesConfig",
    "OptimizerConfig",
    "PreSplitSource",
    "RecBoleSource",
    "ShardingConfig",
    "Source",
    "SparkAppConfig",
    "SplitConfig",
    "WindowConfig",
    "Strict",
    "SyntheticCTRSource",
    "SyntheticInteractionsSource",
    "TableConfig",
    "TableSource",
    "Toleration",
    "TrackingConfig",
    "TrainConfig",
    "TwoTowerConfig",
    "apply_override",
    "config_differences",
    "config_from_dict",
    "dump_config",
    "flatten",
    "load_config",
    "shipped_configs",
]

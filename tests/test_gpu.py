"""GPU tier: the real trainer on CUDA (nccl, fbgemm-gpu's CUDA TBE kernels, the planner's GPU plan).

Skipped without CUDA (tests/conftest.py). Run on a GPU machine with `pytest -m gpu tests/test_gpu.py`.
The same quality bars as the CPU tests: Two-Tower Recall@10 ≥ 2× popularity; DLRM AUC within 0.02 of
the Bayes-optimal AUC of the planted data. MLflow is switched off so the tier needs only torch,
torchrec, fbgemm-gpu and mosaicml-streaming on the machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.config import Config, load_config

pytestmark = pytest.mark.gpu

TT_SET = [
    "data.source.num_users=1000",
    "data.source.num_items=500",
    "data.source.interactions_per_user=30",
    "train.batch_size=256",
    "train.epochs=3",
]
DLRM_SET = [  # the same sizes as tests/test_train.py's DLRM_SET
    "data.source.rows=600000",
    "data.source.num_sparse=8",
    "data.source.cardinality=50",
    "data.source.days=5",
    "train.epochs=4",
]


def _cfg(name: str, sets: list[str], root: Path, extra: list[str] | None = None) -> Config:
    return load_config(
        name,
        [
            *sets,
            f"data.prepared_dir={root / name}",
            "train.device=cuda",
            "tracking.enabled=false",
            *(extra or []),
        ],
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder for this module's prepared data."""
    return tmp_path_factory.mktemp("gpu_data")


def test_two_tower_on_cuda_meets_bar(root: Path) -> None:
    import torch

    from recsys.data.prepare import prepare
    from recsys.train import train

    cfg = _cfg("two_tower_synth", TT_SET, root)
    prepare(cfg, overwrite=False)
    result = train(cfg)
    print("two-tower cuda", result.metrics, result.baselines, f"{result.samples_per_s:.0f} samples/s")
    print(result.plan)
    assert torch.cuda.is_available()
    assert result.metrics["recall@10"] >= 2 * result.baselines["recall@10"], (
        result.metrics,
        result.baselines,
    )


@pytest.mark.parametrize("sharding", ["table_wise", "row_wise"])
def test_dlrm_on_cuda_meets_bayes_bar(root: Path, sharding: str) -> None:
    from recsys.data.prepare import prepare
    from recsys.train import train

    # row_wise exists only on GPU (gloo has no reduce-scatter): this is where it is exercised.
    cfg = _cfg("dlrm_synth", DLRM_SET, root, [f"train.sharding.types=[{sharding}]"])
    if not (Path(cfg.data.prepared_dir) / "metadata.json").exists():  # shared by both parametrizations
        prepare(cfg, overwrite=False)
    result = train(cfg)
    print(f"dlrm cuda {sharding}", result.metrics, result.baselines, f"{result.samples_per_s:.0f} samples/s")
    print(result.plan)
    assert sharding in result.plan
    assert result.metrics["auc"] >= result.baselines["bayes_auc"] - 0.02, (result.metrics, result.baselines)

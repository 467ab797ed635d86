"""The `mlflow-down` chaos scenario, with a shorter outage than `make chaos` (60 s) to fit CI."""

from __future__ import annotations

from pathlib import Path

import pytest

from recsys.chaos import mlflow_down


@pytest.mark.chaos
@pytest.mark.slow
def test_training_survives_mlflow_down_and_its_metrics_arrive(tmp_path: Path) -> None:
    result = mlflow_down.run(tmp_path, outage_s=12, max_steps=200)
    assert set(result) == {"scenario", "injected", "survived", "lost", "recover_s", "detail"}
    assert result["scenario"] == mlflow_down.SCENARIO == "mlflow-down"
    assert result["survived"], result["detail"]
    assert result["lost"].startswith("0 metric points") and "0 train/loss steps missing" in result["lost"]
    assert result["recover_s"] is not None and result["recover_s"] >= 0
    assert "1 warning line(s)" in result["detail"] and "traceback: no" in result["detail"]


def test_console_warnings_are_counted_through_progress_bars() -> None:
    """tqdm redraws with \\r and a line printed during training follows the bar on the same line."""
    text = (
        "train:   1%| 6/600 [00:07, loss=4.27]recsys: warning: MLflow at http://x does not answer\r"
        "train:   2%| 7/600\nmetric val\nTraceback (most recent call last):\n"
    )
    warnings, traceback = mlflow_down._console_faults(text)
    assert warnings == ["recsys: warning: MLflow at http://x does not answer"] and traceback

"""`tracking`: MLflow tracking."""

from __future__ import annotations

from pydantic import Field

from recsys.config.base import Strict


class TrackingConfig(Strict):
    """MLflow tracking."""

    uri: str | None = Field(
        None,
        description="MLflow tracking URI; None: $MLFLOW_TRACKING_URI, else sqlite:///./runs/mlflow.db (artifacts in ./runs/artifacts).",
    )
    experiment: str = Field("recsys", description="MLflow experiment name.")
    run_name: str | None = Field(None, description="Run name (default: <config name>-<model>).")
    log_model: bool = Field(True, description="Log the gathered model and embeddings when they fit.")
    enabled: bool = Field(True, description="Set false to train without MLflow.")
    connect_timeout_s: float = Field(
        120.0,
        gt=0,
        description="Seconds an http(s) tracking server may take to answer at start before the run stops with one line.",
    )
    buffer_points: int = Field(
        100_000,
        ge=1,
        description="Metric points kept in memory while the server does not answer; beyond it the oldest are dropped and counted.",
    )
    flush_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Seconds the run waits for an absent server to take buffered metrics before artifacts and at the end.",
    )

"""`job`: job size and placement (pods, GPUs, volumes, secrets) and the Spark prepare's app."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from recsys.config.base import Strict


class Toleration(Strict):
    """A pod toleration."""

    key: str = Field(description="Taint key.")
    operator: Literal["Equal", "Exists"] = Field("Exists", description="Toleration operator.")
    value: str | None = Field(None, description="Taint value (operator Equal).")
    effect: str | None = Field(None, description="Taint effect (NoSchedule, …).")


class SparkAppConfig(Strict):
    """The Spark prepare as a Kubeflow Spark Operator SparkApplication (`recsys render --data-prep spark`)."""

    image: str = Field(
        "ghcr.io/recsys/trainer:0.1.0-spark",
        description="Driver and executor image: recsys and its locked packages plus Java 17 and Spark's "
        "Kubernetes entrypoint (/opt/entrypoint.sh), as Spark's own images have.",
    )
    spark_version: str = Field("4.3.0", description="Spark version of the image (the pinned pyspark).")
    driver_cores: int = Field(1, ge=1, description="CPU cores of the driver pod.")
    driver_memory: str = Field(
        "2g", description="Driver JVM heap: it holds no per-row data (bench spark-scale ran local[2] in 1g)."
    )
    executor_instances: int = Field(2, ge=1, description="Executor pods.")
    executor_cores: int = Field(4, ge=1, description="CPU cores (concurrent tasks) per executor.")
    executor_memory: str = Field("8g", description="JVM heap per executor (sorts and joins spill beyond it).")
    service_account: str = Field(
        "spark-operator-spark",
        description="ServiceAccount of the driver, allowed to create executor pods (the Spark Operator "
        "Helm chart's default for job namespaces).",
    )
    spark_conf: dict[str, str] = Field(
        default_factory=dict,
        description="Extra Spark properties (sparkConf), e.g. spark.sql.shuffle.partitions.",
    )


class JobConfig(Strict):
    """How big the job is and where it runs; the trainer reads rank/world from the environment."""

    name: str = Field("recsys-train", description="Job name (DNS-1123).")
    namespace: str = Field("recsys", description="Kubernetes namespace.")
    image: str = Field("ghcr.io/recsys/trainer:0.1.0", description="Trainer image.")
    nodes: int = Field(1, ge=1, description="Nodes (pods): Master ×1 + Worker ×(nodes−1).")
    procs_per_node: int = Field(1, ge=1, description="torchrun processes per node (= GPUs per node on GPU).")
    gpus_per_node: int = Field(0, ge=0, description="nvidia.com/gpu per pod (0: CPU job).")
    cpu: str = Field("4", description="CPU request per pod.")
    memory: str = Field("16Gi", description="Memory request and limit per pod.")
    shm_size: str = Field("8Gi", description="Size of the /dev/shm memory emptyDir.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Pod nodeSelector.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Pod tolerations.")
    data_pvc: str = Field("recsys-data", description="PVC mounted at /data (prepared MDS data).")
    checkpoint_pvc: str = Field("recsys-checkpoints", description="PVC mounted at /checkpoints.")
    mlflow_tracking_uri: str = Field(
        "http://mlflow.recsys.svc:5000", description="MLflow URI inside the cluster."
    )
    mlflow_secret: str | None = Field(
        "mlflow-credentials", description="Secret whose keys become env (credentials)."
    )
    mlflow_secret_keys: list[str] = Field(
        default_factory=lambda: [
            "MLFLOW_TRACKING_USERNAME",
            "MLFLOW_TRACKING_PASSWORD",
            "MLFLOW_TRACKING_TOKEN",
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
        ],
        description="Keys of mlflow_secret passed as optional env in TrainJobs (no envFrom there); "
        "PyTorchJobs take every key of the Secret through envFrom.",
    )
    extra_secrets: dict[str, list[str]] = Field(
        default_factory=dict,
        description="More Secrets for the trainer's env, name → keys (all optional; e.g. object-store "
        "credentials); PyTorchJobs take every key through envFrom, TrainJobs the listed keys.",
    )
    env: dict[str, str] = Field(
        default_factory=lambda: {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"},
        description="Extra env of the trainer container (NCCL settings by default).",
    )
    backoff_limit: int = Field(
        2,
        ge=0,
        description="Failures the job survives (each resumes from the last checkpoint); one failure "
        "restarts every pod, so the PyTorchJob's runPolicy.backoffLimit is this × nodes + 1.",
    )
    ttl_seconds_after_finished: int = Field(86400, ge=0, description="Seconds a finished job is kept.")
    service_account: str = Field("recsys-trainer", description="ServiceAccount of the pods.")
    spark: SparkAppConfig = Field(
        default_factory=SparkAppConfig, description="The Spark prepare's SparkApplication (Spark Operator)."
    )

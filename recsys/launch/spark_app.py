"""The Spark prepare on Kubernetes: a ConfigMap + a Kubeflow Spark Operator SparkApplication
(sparkoperator.k8s.io/v1beta2), rendered from the config (`recsys render --data-prep spark`).

The driver runs `recsys/data/spark_mds.py` (the same `prepare_on_spark` as `recsys data prepare --spark`)
with the resolved config mounted from the ConfigMap; executors do the distributed work and write the MDS
shards onto the data PVC, which the driver and every executor mount at /data (ReadWriteMany).
Rendering is pure; the documents are validated against kubeflow-spark-api's models before writing.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from recsys.config import Config, dump_config
from recsys.errors import UserError
from recsys.launch.jobspec import (
    CONFIG_DIR,
    CONFIG_PATH,
    DATA_MOUNT,
    RUN_AS_USER,
    _check_name,
    cluster_config,
)

SPARK_APP = ("sparkoperator.k8s.io/v1beta2", "SparkApplication")
# recsys as installed in the image (images/trainer/Dockerfile.cpu: the venv /opt/venv, Python 3.11); the
# file runs recsys.data.spark_mds.main, spark-submit's way of starting a Python application.
MAIN_FILE = "local:///opt/venv/lib/python3.11/site-packages/recsys/data/spark_mds.py"
PYTHON = "/opt/venv/bin/python"
SPARK_TMP = "/tmp"


def app_name(cfg: Config) -> str:
    """The SparkApplication's name (its driver pod is `<name>-driver`)."""
    return f"{cfg.job.name}-data-prep"


def _pod(cfg: Config, cores: int, memory: str, labels: dict[str, str]) -> dict[str, Any]:
    """The settings driver and executors share: size, labels, non-root security, mounts."""
    return {
        "cores": cores,
        "memory": memory,
        "labels": dict(labels),
        # Istio sidecars keep pods from completing and intercept the driver ↔ executor ports.
        "annotations": {"sidecar.istio.io/inject": "false"},
        "podSecurityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        # Not readOnlyRootFilesystem: Spark's entrypoint writes its work dir in the image.
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "data", "mountPath": DATA_MOUNT},
            {"name": "tmp", "mountPath": SPARK_TMP},
        ],
    }


def render_objects(cfg: Config) -> list[dict[str, Any]]:
    """The documents to apply: the ConfigMap with the resolved config, then the SparkApplication."""
    from recsys.data.spark_mds import source_columns

    source_columns(cfg)  # a `table` source, or one line saying what to set
    job, spark = cfg.job, cfg.job.spark
    name = app_name(cfg)
    _check_name(name, "job.name (+ '-data-prep')", max_len=50)
    _check_name(job.namespace, "job.namespace")
    _check_name(spark.service_account, "job.spark.service_account", max_len=253)
    _check_name(job.data_pvc, "job.data_pvc", max_len=253)
    labels = {
        "app.kubernetes.io/name": "recsys",
        "app.kubernetes.io/component": "data-prep",
        "app.kubernetes.io/instance": name,
    }
    meta = {"name": name, "namespace": job.namespace, "labels": labels}
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {**meta, "name": f"{name}-config"},
        "data": {Path(CONFIG_PATH).name: dump_config(cluster_config(cfg))},
    }
    conf = {
        # Driver and executors run recsys' own interpreter (the venv with streaming, pyarrow, numpy).
        "spark.pyspark.python": PYTHON,
        "spark.pyspark.driver.python": PYTHON,
        "spark.local.dir": SPARK_TMP,
        **spark.spark_conf,
    }
    driver = {
        **_pod(cfg, spark.driver_cores, spark.driver_memory, labels),
        "serviceAccount": spark.service_account,
    }
    executor = {
        **_pod(cfg, spark.executor_cores, spark.executor_memory, labels),
        "instances": spark.executor_instances,
    }
    app = {
        "apiVersion": SPARK_APP[0],
        "kind": SPARK_APP[1],
        "metadata": meta,
        "spec": {
            "type": "Python",
            "pythonVersion": "3",
            "mode": "cluster",
            "image": spark.image,
            "imagePullPolicy": "IfNotPresent",
            "mainApplicationFile": MAIN_FILE,
            "arguments": ["--config", CONFIG_PATH],
            "sparkVersion": spark.spark_version,
            "sparkConf": conf,
            # A rerun refuses to overwrite prepared data: retrying a failed run would fail the same way.
            "restartPolicy": {"type": "Never"},
            "timeToLiveSeconds": job.ttl_seconds_after_finished,
            "volumes": [
                {"name": "config", "configMap": {"name": f"{name}-config"}},
                {"name": "data", "persistentVolumeClaim": {"claimName": job.data_pvc}},
                {"name": "tmp", "emptyDir": {}},
            ],
            "driver": driver,
            "executor": executor,
        },
    }
    return [config_map, app]


def render_command(config: str, overrides: list[str], out: str) -> str:
    """The `recsys render --data-prep spark` command line that reproduces a file."""
    from recsys.launch.kube import command_line

    return command_line(["--data-prep", "spark"], config, overrides, out)


def render_text(cfg: Config, generated_by: str, path: str) -> str:
    """The whole file: generated-by line, a header with Apply/Check/Logs/Clean, then the validated documents."""
    from recsys.launch.kube import to_yaml
    from recsys.launch.kubeschema import validate_documents

    docs = render_objects(cfg)
    validate_documents(docs, origin=f"render of {cfg.name} (data-prep spark)")
    name, ns, spark = app_name(cfg), cfg.job.namespace, cfg.job.spark
    prepared = cluster_config(cfg).data.prepared_dir
    lines = [
        f"# generated by {generated_by} — do not edit (regenerate: make manifests)",
        f"# SparkApplication (sparkoperator.k8s.io/v1beta2) preparing config {cfg.name!r} with Spark: "
        f"{cluster_config(cfg).data.source.path} → {prepared}",  # type: ignore[union-attr]
        f"# (python -m recsys.data.spark_mds, the same code as `recsys data prepare --spark`); driver {spark.driver_cores} "
        f"core(s)/{spark.driver_memory}, {spark.executor_instances} executor(s) × {spark.executor_cores} core(s)/{spark.executor_memory}.",
        f"# ConfigMap {name}-config holds the resolved config, mounted at {CONFIG_PATH}; PVC {cfg.job.data_pvc} at /data",
        "# on the driver and every executor (ReadWriteMany: executors write the shards, the driver the index/vocab).",
        f"# Needs the Kubeflow Spark Operator (v2) watching namespace {ns}, its ServiceAccount {spark.service_account},",
        f"# and image {spark.image} (recsys + Java 17 + Spark's entrypoint; see docs/guides/spark-data-prep.md).",
        f"# Apply: kubectl apply -f {path}",
        f"# Check: kubectl -n {ns} get sparkapplication {name} -w",
        f"# Logs:  kubectl -n {ns} logs -f {name}-driver",
        f"# Clean: kubectl delete -f {path}   (the prepared data stays on the PVC)",
    ]
    return "\n".join(lines) + "\n---\n" + to_yaml(docs)


def render_to_file(cfg: Config, out: str, generated_by: str) -> None:
    """Render the SparkApplication of `cfg` to `out` ('-' for stdout), validated, with its header."""
    from recsys.launch.kube import write_rendered

    text = render_text(cfg, generated_by, out if out != "-" else "<file>")
    write_rendered(text, out, f"ConfigMap + SparkApplication {app_name(cfg)}")


def check_backend_choice(backend: str | None, data_prep: str | None) -> None:
    """`recsys render` takes exactly one of --backend (training) and --data-prep (the prepare)."""
    if (backend is None) == (data_prep is None):
        raise UserError("recsys render: pass either --backend pytorchjob|trainjob or --data-prep spark")

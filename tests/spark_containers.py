"""A rendered SparkApplication's driver and executor pods as `docker run` options, the way Spark's Kubernetes
backend sets them up (tests/test_image_build.py runs them as containers of the Spark image).

What the Spark Operator does for a SparkApplication: it runs spark-submit in cluster mode against the API
server, whose Kubernetes backend creates the driver pod (args `driver --properties-file
/opt/spark/conf/spark.properties --class org.apache.spark.deploy.PythonRunner <mainApplicationFile>
<arguments>`, SPARK_DRIVER_BIND_ADDRESS = the pod IP, the properties from a ConfigMap mounted at
SPARK_CONF_DIR); the driver then creates executor pods (args `executor`, the SPARK_* env). Without an API
server the test writes that properties file itself and starts the pods' containers directly; the pod
spec's own parts (user, capabilities, mounts) come from the rendered SparkApplication by way of
tests/pod_containers.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# Where Spark's Kubernetes backend mounts the pod's spark.properties (Constants.SPARK_CONF_DIR_INTERNAL).
SPARK_CONF_DIR = "/opt/spark/conf"
PROPERTIES = f"{SPARK_CONF_DIR}/spark.properties"
# Spark's Kubernetes defaults for the driver's ports (spark.driver.port, spark.blockManager.port).
DRIVER_PORT, BLOCK_MANAGER_PORT = 7078, 7079


def write_rows_parquet(path: Path, n: int = 2000) -> Path:
    """Interaction rows as tests/test_spark.py's: null dense values, null and rare ids, timestamp ties."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    d1 = rng.exponential(3, n)
    d1[rng.random(n) < 0.1] = np.nan
    c1: list[str | None] = [f"c{v:x}" for v in rng.zipf(1.3, n) % 400]
    for i in np.flatnonzero(rng.random(n) < 0.05):
        c1[i] = None
    table = pa.table(
        {
            "user_id": pa.array([f"u{u}" for u in rng.integers(0, 100, n)]),
            "item_id": pa.array((rng.zipf(1.5, n) % 200).astype(np.int64)),
            "rating": pa.array(rng.integers(1, 6, n).astype(np.float64)),
            "ts": pa.array(rng.integers(0, 500, n).astype(np.int64)),
            "d1": pa.array(d1),
            "d2": pa.array(rng.integers(-2, 50, n).astype(np.int32)),
            "c1": pa.array(c1, type=pa.string()),
        }
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
    return path


def role_pod(app: dict[str, Any], role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, container) of the SparkApplication's `driver` or `executor`, in pod_containers' shape."""
    spec, part = app["spec"], app["spec"][role]
    pod_spec = {"securityContext": part["podSecurityContext"], "volumes": spec["volumes"]}
    container = {"securityContext": part["securityContext"], "volumeMounts": part["volumeMounts"]}
    return pod_spec, container


def driver_service(app: dict[str, Any]) -> str:
    """The driver's headless Service name, which Spark's backend sets as spark.driver.host."""
    return f"{app['metadata']['name']}-driver-svc.{app['metadata']['namespace']}.svc"


def properties_text(app: dict[str, Any], master: str, extra: dict[str, str] | None = None) -> str:
    """The driver pod's spark.properties: the application's sparkConf, sizes and name, with `master`
    instead of the cluster's k8s:// URL (no API server here)."""
    spec = app["spec"]
    props = {
        **spec["sparkConf"],
        "spark.master": master,
        "spark.app.name": app["metadata"]["name"],
        "spark.submit.deployMode": "cluster",
        "spark.driver.host": driver_service(app),
        "spark.driver.port": str(DRIVER_PORT),
        "spark.driver.blockManager.port": str(BLOCK_MANAGER_PORT),
        "spark.driver.cores": str(spec["driver"]["cores"]),
        "spark.driver.memory": spec["driver"]["memory"],
        "spark.executor.cores": str(spec["executor"]["cores"]),
        "spark.executor.memory": spec["executor"]["memory"],
        **(extra or {}),
    }
    # Java properties format: '\' escapes, one `key=value` a line.
    return "".join(f"{k}={v.replace(chr(92), chr(92) * 2)}\n" for k, v in props.items())


def driver_args(app: dict[str, Any]) -> list[str]:
    """The driver container's args, as Spark's Kubernetes backend writes them for a Python application."""
    spec = app["spec"]
    assert spec["type"] == "Python" and spec["mode"] == "cluster", spec
    return [
        "driver",
        "--properties-file",
        PROPERTIES,
        "--class",
        "org.apache.spark.deploy.PythonRunner",
        spec["mainApplicationFile"],
        *spec["arguments"],
    ]


def executor_memory_env(memory: str) -> str:
    """SPARK_EXECUTOR_MEMORY as Spark's backend writes it: the heap in MiB (`1g` → `1024m`)."""
    units = {"k": 1 / 1024, "m": 1, "g": 1024, "t": 1024 * 1024}
    return f"{int(float(memory[:-1]) * units[memory[-1].lower()])}m"


def executor_java_opts(props: dict[str, str]) -> list[str]:
    """SPARK_JAVA_OPT_<n> values of an executor pod: the driver's spark.executor.extraJavaOptions (Spark
    adds the Java module opens to it at start) split into options, then -D for the settings an executor
    needs before it can talk to the driver (RPC, network, authentication, TLS)."""
    import shlex

    opts = shlex.split(props.get("spark.executor.extraJavaOptions", ""))
    startup = ("spark.rpc", "spark.network", "spark.ssl", "spark.auth")
    secret = "spark.authenticate.secret"
    opts += [f"-D{k}={v}" for k, v in sorted(props.items()) if k.startswith(startup) and k != secret]
    return opts


def executor_env(
    app: dict[str, Any], props: dict[str, str], app_id: str, executor_id: int, host: str
) -> dict[str, str]:
    """The env Spark's driver puts on executor pod `executor_id` (BasicExecutorFeatureStep), with `host`
    (a name the network resolves) where the pod's IP would be."""
    spec = app["spec"]["executor"]
    env = {
        "SPARK_DRIVER_URL": f"spark://CoarseGrainedScheduler@{driver_service(app)}:{DRIVER_PORT}",
        "SPARK_EXECUTOR_CORES": str(spec["cores"]),
        "SPARK_EXECUTOR_MEMORY": executor_memory_env(spec["memory"]),
        "SPARK_APPLICATION_ID": app_id,
        "SPARK_EXECUTOR_ID": str(executor_id),
        "SPARK_RESOURCE_PROFILE_ID": "0",
        "SPARK_EXECUTOR_POD_IP": host,
        "SPARK_EXECUTOR_POD_NAME": host,
        "SPARK_LOCAL_DIRS": app["spec"]["sparkConf"]["spark.local.dir"],
    }
    for i, opt in enumerate(executor_java_opts(props)):
        env[f"SPARK_JAVA_OPT_{i}"] = opt
    return env


# Asked inside the driver container: its application id and Spark properties, from the REST API of the
# driver's UI (port 4040), once the application is up.
DRIVER_PROPERTIES_SCRIPT = """
import json, urllib.request as u
base = "http://127.0.0.1:4040/api/v1/applications"
(app,) = json.load(u.urlopen(base, timeout=5))
env = json.load(u.urlopen(f"{base}/{app['id']}/environment", timeout=5))
print(json.dumps({"id": app["id"], "props": dict(env["sparkProperties"])}))
"""

"""The built model under MLServer + mlserver-mlflow (what KServe runs for `modelFormat: mlflow`), over the
KServe V2 REST protocol, in its own virtualenv: the model's pinned requirements, MLServer 1.7.1, the
pandas 2 line KServe's runtime ships, and no recsys installed (its serving code travels with the model).

The virtualenv is created once and cached under $RECSYS_TEST_ENVS or ~/.cache/recsys-test-envs (one
folder per package set); the test is skipped, saying why, only when it cannot be created.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from recsys.chaos.serve_requests import build_tiny_model, free_port, post, running

#: MLServer as KServe's MLflow runtime runs it. uvloop 0.22+ makes MLServer 1.7.1's inference
#: workers die at start (`asyncio.get_event_loop()` raises there), so the one released before it.
MLSERVER = ["mlserver==1.7.1", "mlserver-mlflow==1.7.1", "uvloop==0.21.0"]
#: kserve 0.21 pins pandas<3: the line a KServe MLflow runtime image has.
RUNTIME_PANDAS = "pandas==2.3.3"


def _packages() -> list[str]:
    """What the serving venv installs: MLServer, the model's own pins (pandas: the runtime's)."""
    from recsys.retrieval.serve import pip_requirements

    return [*MLSERVER, *(r for r in pip_requirements() if not r.startswith("pandas")), RUNTIME_PANDAS]


def mlserver_venv() -> Path:
    """The cached virtualenv with `_packages()`, built on first use; complete once its stamp exists."""
    packages = _packages()
    key = hashlib.sha256("\n".join([sys.version, *packages]).encode()).hexdigest()[:12]
    root = Path(os.environ.get("RECSYS_TEST_ENVS") or Path.home() / ".cache" / "recsys-test-envs")
    venv, stamp = root / f"mlserver-{key}", root / f"mlserver-{key}.done"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a torn earlier attempt
    root.mkdir(parents=True, exist_ok=True)
    start, log = time.monotonic(), root / f"mlserver-{key}.log"
    with open(log, "w") as out:
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out, stderr=subprocess.STDOUT)
        if made.returncode == 0:
            pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
            made = subprocess.run([*pip, *packages], stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if made.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        tail = "\n".join(line for line in log.read_text().splitlines() if "is ignored" not in line)[-1500:]
        pytest.skip(f"cannot create the MLServer virtualenv ({' '.join(packages)}):\n{tail}")
    stamp.write_text(f"{time.monotonic() - start:.0f} s to create\n" + "\n".join(packages) + "\n")
    return venv


def _v2_request(users: list[str], ks: list[int]) -> dict[str, Any]:
    """A KServe V2 inference request with one tensor per column."""
    return {
        "inputs": [
            {"name": "user_id", "shape": [len(users)], "datatype": "BYTES", "data": users},
            {"name": "k", "shape": [len(ks)], "datatype": "INT64", "data": ks},
        ]
    }


def _columns(response: dict[str, Any]) -> dict[str, list[Any]]:
    """A V2 response's outputs by name; list columns arrive as JSON text (MLServer's pd_json)."""
    out = {}
    for tensor in response["outputs"]:
        data = tensor["data"]
        if tensor.get("parameters", {}).get("content_type") == "pd_json":
            data = [json.loads(v) for v in data]
        out[tensor["name"]] = data
    return out


@pytest.mark.slow
def test_mlserver_v2_answers_like_the_pyfunc(tmp_path: Path) -> None:
    import mlflow

    venv = mlserver_venv()
    model = build_tiny_model(tmp_path / "build")
    users = [model.known_users[0], "nobody", model.known_users[1], model.known_users[2]]
    ks = [5, 5, 3, 10]
    want = mlflow.pyfunc.load_model(str(model.path)).predict(pd.DataFrame({"user_id": users, "k": ks}))

    port, grpc, metrics = free_port(), free_port(), free_port()
    (tmp_path / "server").mkdir()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc, "metrics_port": metrics}
    (tmp_path / "server" / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": "recsys",
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": str(model.path)},
    }
    (tmp_path / "server" / "model-settings.json").write_text(json.dumps(model_settings))
    # No PYTHONPATH: recsys must come from the model's code/, not from this checkout.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(venv / "bin" / "mlserver"), "start", str(tmp_path / "server")]
    url = f"http://127.0.0.1:{port}/v2/models/recsys"
    with running(cmd, f"{url}/ready", tmp_path / "mlserver.log", env, timeout=180):
        status, text = post(f"{url}/infer", json.dumps(_v2_request(users, ks)).encode())
        assert status == 200, text
        got = _columns(json.loads(text))
        assert got["user_id"] == users
        assert got["items"] == want["items"].tolist()
        assert got["scores"] == want["scores"].tolist()
        assert got["fallback"] == want["fallback"].tolist() == [False, True, False, False]
        assert [len(i) for i in got["items"]] == ks

        # The model's own checks: 400 with its message (an MLServer error, not a 500).
        for request, expect in [
            (_v2_request([users[0]], [0]), "k must be between 1 and 1000"),
            (
                {"inputs": [{"name": "k", "shape": [1], "datatype": "INT64", "data": [3]}]},
                "missing column 'user_id'",
            ),
        ]:
            status, text = post(f"{url}/infer", json.dumps(request).encode())
            assert status == 400 and expect in json.loads(text)["error"], (status, text)
        status, text = post(f"{url}/infer", b"{}")  # not a V2 request at all: MLServer's own 422
        assert 400 <= status < 500, (status, text)

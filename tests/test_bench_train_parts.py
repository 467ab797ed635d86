"""bench-train's per-step table (also train-scale's): wall and CPU ms per step of both modes beside the
full path's timed extras, so the table accounts for the whole step difference."""

from __future__ import annotations

from recsys.bench.train import PARTS, _parts_table, summarize


def _record(rep: int, mode: str, seconds: float, cpu_s: float, parts: dict[str, float]) -> dict:
    return {
        "rep": rep,
        "mode": mode,
        "rank": 0,
        "seconds": seconds,
        "cpu_s": cpu_s,
        "run_s": 9.0,
        "parts": {p: parts.get(p, 0.0) for p in PARTS},
        "peak_mib": 100.0,
    }


def test_parts_table_shows_cpu_per_step_and_the_sigterm_agreement() -> None:
    steps = 10
    records = [
        _record(0, "bare", 2.0, 1.9, {}),
        _record(0, "full", 2.1, 1.95, {"loader": 0.009, "preempt": 0.002}),
        _record(1, "full", 2.3, 1.97, {"loader": 0.011, "preempt": 0.004}),
        _record(1, "bare", 2.2, 1.93, {}),
    ]
    s = summarize({"world": 1, "records": records}, steps)
    assert round(s["bare"]["cpu_ms"], 6) == 191.5 and round(s["full"]["cpu_ms"], 6) == 196.0
    assert round(s["full"]["parts_ms"]["preempt"], 6) == 0.3
    header, _, row = _parts_table([{"model": "dlrm", "ranks": 1, **s}]).splitlines()
    cols = [c.strip() for c in header.strip("|").split("|")]
    vals = [c.strip() for c in row.strip("|").split("|")]
    got = dict(zip(cols, vals, strict=True))
    assert got["step ms bare"] == "210" and got["step ms full"] == "220"
    assert got["CPU ms bare"] == "192" and got["CPU ms full"] == "196"
    assert got["loader ms"] == "1.0" and got["preempt ms"] == "0.3"

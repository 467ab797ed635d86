"""Chaos: `mlflow models serve` of a built model under malformed and oversized requests
(recsys/chaos/serve_requests.py), plus the scenario's request list and answer check without a server."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from recsys.chaos import serve_requests


@pytest.mark.chaos
@pytest.mark.slow
def test_served_model_survives_malformed_and_oversized_requests(tmp_path: Path) -> None:
    result = serve_requests.run(tmp_path)
    print(json.dumps(result, indent=1))  # shown with -rA / -s: what was sent, how long, what it answered
    assert set(result) == {"scenario", "injected", "survived", "lost", "recover_s", "detail"}
    assert result["scenario"] == serve_requests.SCENARIO
    assert result["survived"], result
    assert result["lost"] == "nothing" and result["recover_s"] is not None, result


def test_bad_requests_cover_the_faults_and_stay_bounded() -> None:
    requests = serve_requests.bad_requests("u1")
    names = [what for what, _, _ in requests]
    assert len(requests) == len(set(names)) <= 50  # bounded, each fault once
    for fault in (
        "empty body",
        "not JSON",
        "100,000 rows",
        "k = 10^400",
        "user_id a number",
        "missing user_id",
    ):
        assert fault in names, fault
    assert sum(name.startswith("random JSON") for name in names) == serve_requests.RANDOM_BODIES
    assert requests == serve_requests.bad_requests("u1")  # seeded: the same bodies every run
    big = dict((what, body) for what, body, _ in requests)["100,000 rows"]
    assert len(json.loads(big)["dataframe_records"]) == serve_requests.OVERSIZED_ROWS


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ('{"error_code": "INVALID_PARAMETER_VALUE", "message": "k must be an integer"}', True),
        ('{"error": "k must be between 1 and 1000"}', True),
        ("This predictor only supports the following content types", True),
        ('{"message": ""}', False),
        ("", False),
        ("[]", False),
    ],
)
def test_an_answer_must_carry_a_message(text: str, ok: bool) -> None:
    assert serve_requests._has_message(text) is ok

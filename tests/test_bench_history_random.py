"""The random split's history rule of `recsys bench quality` (recsys/bench/history_random.py): a user's
history for scoring val holds train items only, for test train and val items, last L in time order
(ties: file order) — never an item of the scored part or a later one — on a hand-made ratings file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from recsys.bench.history_random import known_histories, timed_parts
from recsys.bench.quality import random_split_of
from recsys.data.splits import random_split

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
FRACTIONS = (0.3, 0.3, 4)  # val, test, seed: every part has rows on a small file


def write_inter(path: Path, users: int = 6, rows: int = 120, seed: int = 3) -> list[tuple[str, str, int]]:
    """(user, item, time) rows in file order (not time order, many tied times); item k is line k's own."""
    rng = np.random.default_rng(seed)
    events = [(str(1 + int(u)), str(100 + k), int(t)) for k, (u, t) in
              enumerate(zip(rng.integers(0, users, rows), rng.integers(0, 15, rows), strict=True))]  # fmt: skip
    path.write_text(HEADER + "".join(f"{u}\t{i}\t5\t{t}\n" for u, i, t in events))
    return events


@pytest.mark.parametrize("at", ["last", "first"])
def test_histories_hold_only_known_parts_last_l_in_time_order(tmp_path: Path, at: str) -> None:
    events = write_inter(tmp_path / "r.inter")
    split = random_split_of(tmp_path / "r.inter", *FRACTIONS)
    pairs, parts = timed_parts(tmp_path / "r.inter", split, *FRACTIONS)
    part_of_line = random_split(len(events), *FRACTIONS)
    length = 9
    for code, (part, known) in enumerate(
        {"val": {0}, "test": {0, 1}}.items(), 1
    ):  # the rule (0 train, 1 val)
        hists = known_histories(pairs, parts, part, len(split.user_ids), length, at)
        scored = {(split.user_ids[u], split.item_ids[i]) for u, i in getattr(split, part)}
        for u, hist in enumerate(hists):
            user = split.user_ids[u]
            got = [split.item_ids[i] for i in hist]
            # Reference from the raw lines: the user's lines in known parts, by (time, line), last L;
            # "first": only lines before the user's first line of the scored part.
            mine = sorted((t, k) for k, (u2, _, t) in enumerate(events) if u2 == user)
            first = min([(t, k) for t, k in mine if part_of_line[k] == code], default=(math.inf, 0))
            lines = [(t, k) for t, k in mine if part_of_line[k] in known and (at == "last" or (t, k) < first)]
            assert got == [events[k][1] for _, k in lines][-length:], (part, user)
            assert not {(user, i) for i in got} & scored  # nothing of the part being scored
            assert all(part_of_line[int(i) - 100] in known for i in got)  # nor of a later part
            if at == "first":  # nothing later in time than a scored row
                assert all((events[int(i) - 100][2], int(i) - 100) < first for i in got)
        assert any(0 < len(h) < length for h in hists)  # the data exercises short histories
        assert at == "first" or any(len(h) == length for h in hists)  # and truncation
    assert {int(p) for p in parts} == {0, 1, 2}


def test_standalone_command_uses_the_recorded_two_tower() -> None:
    """`python -m recsys.bench.history_random` compares with RECORDED_TWO_TOWER: its TT_GRID candidate and
    test figures must be the `two-tower` row of the recorded quality run, or its ratios mix two models."""
    import ast
    import re

    from recsys.bench.history_random import RECORDED_TWO_TOWER
    from recsys.bench.quality import TT_GRID

    record = (Path(__file__).parents[1] / "docs/benchmarks/results/quality.txt").read_text()
    chosen = ast.literal_eval(re.search(r"\] two-tower: chosen (\{.*\})\n", record).group(1))
    row = re.search(r"^two-tower +[\d.]+ +([\d.]+) ± [\d.]+ +([\d.]+) ±", record, re.M)
    index, figures = RECORDED_TWO_TOWER
    assert TT_GRID[index] == chosen
    assert figures == {"ndcg@10": float(row.group(1)), "recall@10": float(row.group(2))}

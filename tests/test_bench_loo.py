"""The leave-one-out protocol of `recsys bench quality --protocol loo` on hand-made interaction tables:
which rating is val/test (time order, file-order ties), seen-item removal, exact metrics of known
rankings, and the SASRec reference learning a toy sequential pattern."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.bench.loo import K, LooEvaluator, loo_data
from recsys.bench.quality import Split

HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"


ITEM = {"a": "101", "b": "102", "c": "103", "d": "104", "e": "105", "9": "9"}  # names → numeric raw ids
NAME = {v: k for k, v in ITEM.items()}


def write_inter(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    """A RecBole .inter file of (user, item, timestamp) rows in the given (file) order."""
    path.write_text(HEADER + "".join(f"{u}\t{ITEM.get(i, i)}\t5\t{t}\n" for u, i, t in rows))
    return path


# File order is not time order; user 1's last two ratings tie at t=30 (c is later in the file, so c is
# test and d, tied but earlier in the file, is val); user 2's tie at t=5 sits in train; item 9 is rated
# only by user 3 as test, so no model can learn it (ranked last: a miss).
ROWS = [
    ("1", "d", 30), ("2", "b", 5), ("1", "a", 10), ("2", "a", 5), ("3", "9", 40), ("1", "e", 5),
    ("2", "c", 1), ("1", "c", 30), ("2", "e", 8), ("3", "a", 1), ("2", "d", 9), ("3", "b", 2),
    ("3", "c", 3), ("1", "b", 20), ("4", "b", 4), ("4", "d", 1), ("4", "e", 2), ("4", "a", 3),
]  # fmt: skip


def item_names(split: Split, items: Iterable[int]) -> list[str]:
    """The test's names of dense item rows."""
    return [NAME[split.item_ids[i]] for i in items]


def row(split: Split, name: str) -> int:
    """The dense row of a named item."""
    return split.item_ids.index(ITEM[name])


def test_split_takes_last_by_time_with_file_order_ties(tmp_path: Path) -> None:
    data = loo_data(write_inter(tmp_path / "t.inter", ROWS))
    s = data.split
    assert s.user_ids == ["1", "2", "3", "4"]
    test = {s.user_ids[u]: NAME[s.item_ids[i]] for u, i in s.test}
    val = {s.user_ids[u]: NAME[s.item_ids[i]] for u, i in s.val}
    assert test == {"1": "c", "2": "d", "3": "9", "4": "b"}
    assert val == {"1": "d", "2": "e", "3": "c", "4": "a"}
    # Train sequences in time order; user 2's tie at t=5 (b before a in the file) keeps file order.
    seqs = [["e", "a", "b"], ["c", "b", "a"], ["a", "b"], ["d", "e"]]
    assert [item_names(s, q) for q in data.train_seqs] == seqs
    assert [item_names(s, q) for q in data.test_seqs] == [
        q + [val[u]] for q, u in zip(seqs, "1234", strict=True)
    ]


def test_seen_items_removed_and_cold_items_last(tmp_path: Path) -> None:
    data = loo_data(write_inter(tmp_path / "t.inter", ROWS))
    s, ev = data.split, LooEvaluator(data.split)
    # One score order for everyone; the cold item 9 (only user 3's test) scored highest, yet ranked last.
    scores = torch.tensor([100.0, 1, 2, 3, 5, 4]).expand(len(s.user_ids), -1)  # 9, a, b, c, d, e
    assert [NAME[x] for x in s.item_ids] == ["9", "a", "b", "c", "d", "e"]
    train = {(u, i) for u, i in s.train.tolist()}
    val = {(u, i) for u, i in s.val.tolist()}
    for part, seen in (("val", train), ("test", train | val)):
        lists = ev.lists(scores, part)
        for u in range(len(s.user_ids)):
            listed = [i for i in lists[u].tolist() if i >= 0]
            assert not {(u, i) for i in listed} & seen, (part, u)
            # Everything not seen is listed (the catalogue is smaller than K), nothing seen is.
            assert len(listed) == len(s.item_ids) - len({i for v, i in seen if v == u}), (part, u)
    # User 3 (seen a, b; test also c): d and e by score, then the cold item 9 despite its top score.
    assert item_names(s, ev.lists(scores, "test")[2].tolist()[:3]) == ["d", "e", "9"]
    # Test ranks after removing what each user saw: user 1's c 1st, 2's d 1st, 3's 9 3rd, 4's b 2nd.
    m = ev(scores, "test")
    assert m["hr@10"] == 1.0 and m["mrr@10"] == pytest.approx((1 + 1 + 1 / 3 + 1 / 2) / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 + 1 / math.log2(4) + 1 / math.log2(3)) / 4)
    # Val (train items removed only): user 1's d 1st; 2's e 2nd (after d); 3's c 3rd (d, e); 4's a 3rd (c, b).
    assert ev(scores, "val")["mrr@10"] == pytest.approx((1 + 1 / 2 + 1 / 3 + 1 / 3) / 4)


def test_metrics_of_known_ranks_are_exact() -> None:
    # 4 users, 30 items; each user's target at a chosen rank of a fixed score order (no seen items).
    from recsys.bench.loo import loo_metrics

    order = torch.arange(30).flip(0)  # items 29, 28, ... by score
    lists = order[:K].repeat(4, 1)
    ranks = {0: 1, 1: 3, 2: 10, 3: 11}  # rank 11 is outside the top 10: a miss
    targets = {u: int(order[r - 1]) for u, r in ranks.items()}
    m = loo_metrics(lists, 30, targets)
    assert m["hr@10"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(11)) / 4)
    assert m["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 10) / 4)


def test_sasrec_learns_next_item(tmp_path: Path) -> None:
    """Item i is always followed by i + 1: the reference must find each user's next item (HR@10 ≈ 1)."""
    from recsys.bench.loo import fit_sasrec

    rng = np.random.default_rng(0)
    rows = []
    for u in range(150):
        start = int(rng.integers(0, 48))
        rows += [(str(u), str(start + n), float(n)) for n in range(12)]
    data = loo_data(write_inter(tmp_path / "seq.inter", rows))
    ev = LooEvaluator(data.split)
    hp = {"hidden": 32, "heads": 1, "layers": 1, "max_len": 16, "dropout": 0.1, "lr": 5e-3,
          "batch_size": 64, "epochs": 40, "patience": 5}  # fmt: skip
    _, test_scores, val_ndcg = fit_sasrec(data, ev, hp, seed=0)
    m = ev(test_scores, "test")
    assert val_ndcg > 0.8 and m["hr@10"] > 0.95 and m["ndcg@10"] > 0.8, (val_ndcg, m)


def test_sasrec_is_causal() -> None:
    """A position's state depends on its own and earlier items only."""
    from recsys.bench.sasrec import SASRec

    torch.manual_seed(0)
    model = SASRec(items=20, hidden=16, layers=2, heads=2, max_len=8, dropout=0.0).eval()
    seq = torch.tensor([[0, 0, 3, 7, 1, 9, 4, 2]])
    changed = seq.clone()
    changed[0, 5:] = torch.tensor([11, 12, 13])  # a different future after position 4
    with torch.no_grad():
        a, b = model(seq), model(changed)
        assert torch.allclose(a[0, :5], b[0, :5], atol=1e-6)
        assert not torch.allclose(a[0, 5:], b[0, 5:], atol=1e-3)


@pytest.mark.slow
def test_bench_quality_loo_quick_smoke(tmp_path: Path, ml100k_recbole: Path) -> None:
    """`recsys bench quality --protocol loo --quick` runs end to end: the product's prepared leave-last
    split agrees with the bench's, every row prints, and the popularity row is the exact figure."""
    import os
    import re
    import subprocess
    import sys

    from recsys.bench.quality import popularity_scores

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RECSYS_TEST_DATA": str(ml100k_recbole.parent)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "recsys", "bench", "quality", "--protocol", "loo", "--quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(
            r"^(popularity|bpr-mf|sasrec|two-tower|sequential|two-tower-history)\s+(\d\.\d{4}) (.*)$", line
        )
        if m:
            rows[m.group(1)] = [float(x) for x in re.findall(r"\d+\.\d+(?= ±)", m.group(3))]
    assert {"popularity", "bpr-mf", "sasrec", "two-tower"} <= set(rows), proc.stdout[-3000:]
    data = loo_data(ml100k_recbole / "ml-100k.inter")
    pop = LooEvaluator(data.split)(popularity_scores(data.split), "test")
    assert rows["popularity"] == pytest.approx([pop["hr@10"], pop["ndcg@10"], pop["mrr@10"]], abs=6e-5)
    assert "Aims of issue 19" in proc.stdout


def test_sequential_candidates_load_on_the_shipped_config() -> None:
    """Every candidate of the sequential row is a valid --set list for the shipped sequential config
    (a renamed field would otherwise drop the row as 'not available in this build')."""
    from recsys.bench.loo import SEQUENTIAL, SEQUENTIAL_CANDIDATES, unavailable
    from recsys.bench.quality import assignments

    assert SEQUENTIAL_CANDIDATES
    for hp in SEQUENTIAL_CANDIDATES:
        assert unavailable(SEQUENTIAL, assignments(hp)) is None, hp

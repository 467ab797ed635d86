"""Metric functions against hand-computed cases, exclusion, ties, baselines, and a 2-rank gloo reduction."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from recsys.metrics import (
    CTRMetrics,
    combine_retrieval,
    constant_ctr_baseline,
    popularity_baseline,
    retrieval_metrics,
    top_k,
)

L2 = math.log2


# ---------------------------------------------------------------------------------------- ranking
def test_ctr_metrics_hand_computed() -> None:
    # positives score 0.9 and 0.4, negatives 0.2 and 0.6: of the 4 (pos, neg) pairs, 0.4 < 0.6
    # is the only one ranked wrong, so AUC = 3/4.
    probs = torch.tensor([0.9, 0.2, 0.6, 0.4])
    labels = torch.tensor([1, 0, 0, 1])
    m = CTRMetrics()
    m.update(probs[:3], labels[:3])  # two batches must equal one
    m.update(probs[3:], labels[3:])
    out = m.compute()
    assert out["auc"] == pytest.approx(0.75)
    # BCE per row: -ln 0.9, -ln(1-0.2), -ln(1-0.6), -ln 0.4
    assert out["logloss"] == pytest.approx(
        -(math.log(0.9) + math.log(0.8) + math.log(0.4) + math.log(0.4)) / 4
    )
    # mean prediction 2.1/4 = 0.525 over mean label 0.5
    assert out["calibration"] == pytest.approx(1.05)
    assert out["ctr"] == 0.5 and out["count"] == 4


def test_ctr_metrics_match_sklearn_on_random_batches() -> None:
    from sklearn.metrics import log_loss, roc_auc_score

    g = torch.Generator().manual_seed(0)
    probs = torch.rand(1000, generator=g)
    labels = (torch.rand(1000, generator=g) < probs).long()
    m = CTRMetrics()
    for chunk_p, chunk_y in zip(probs.split(128), labels.split(128), strict=True):
        m.update(chunk_p, chunk_y)
    out = m.compute()
    assert out["auc"] == pytest.approx(roc_auc_score(labels.numpy(), probs.numpy()), abs=1e-6)
    assert out["logloss"] == pytest.approx(
        log_loss(labels.numpy(), probs.numpy().astype(np.float64)), abs=1e-6
    )
    m.reset()
    m.update(torch.tensor([0.5]), torch.tensor([1]))
    assert m.compute()["count"] == 1


def test_ctr_metrics_reject_logits_and_single_class_auc_is_nan() -> None:
    m = CTRMetrics()
    with pytest.raises(ValueError, match="probabilities"):
        m.update(torch.tensor([2.5, -1.0]), torch.tensor([1, 0]))
    with pytest.raises(ValueError, match="labels"):
        m.update(torch.tensor([0.5, 0.5]), torch.tensor([2, 0]))
    m.update(torch.tensor([0.3, 0.6]), torch.tensor([0, 0]))
    out = m.compute()
    assert math.isnan(out["auc"]) and math.isnan(out["calibration"]) and out["ctr"] == 0.0


def test_constant_ctr_baseline() -> None:
    labels = [1, 0, 0, 1]
    out = constant_ctr_baseline(0.25, labels)
    # predict 0.25 everywhere: two rows cost -ln 0.25, two cost -ln 0.75
    assert out["logloss"] == pytest.approx(-(2 * math.log(0.25) + 2 * math.log(0.75)) / 4)
    assert out["auc"] == 0.5 and out["calibration"] == pytest.approx(0.5) and out["count"] == 4
    m = CTRMetrics()
    m.update(torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor(labels))
    assert m.constant_baseline(0.25) == pytest.approx(out)
    # predicting the test CTR itself is the best constant: its log loss is the label entropy
    assert constant_ctr_baseline(0.5, labels)["logloss"] == pytest.approx(math.log(2))


def _ctr_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    try:
        probs, labels = _ctr_data()
        # Unequal shares: rank 0 gets rows [0, 37) in one batch, rank 1 rows [37, 200) in three.
        lo, hi = (0, 37) if rank == 0 else (37, 200)
        m = CTRMetrics()
        for p, y in zip(probs[lo:hi].split(60), labels[lo:hi].split(60), strict=True):
            m.update(p, y)
        # A rank with no rows at all (rank 1 here) must still join the reduction.
        only0 = CTRMetrics()
        if rank == 0:
            only0.update(probs[:50], labels[:50])
        result = {"split": m.compute(), "only0": only0.compute(), "base": m.constant_baseline(0.3)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        torch.distributed.destroy_process_group()


def _ctr_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    probs = torch.rand(200, generator=g)
    return probs, (torch.rand(200, generator=g) < probs).long()


@pytest.mark.dist
@pytest.mark.timeout(120)  # a desynchronised collective hangs rather than fails
def test_ctr_metrics_reduce_across_two_gloo_ranks(tmp_path: Path) -> None:
    # fork, as DataLoader workers do: spawn would re-import torchmetrics (~10 s) in each child.
    torch.multiprocessing.start_processes(
        _ctr_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True, start_method="fork"
    )
    probs, labels = _ctr_data()
    full, first50 = CTRMetrics(), CTRMetrics()
    full.update(probs, labels)
    first50.update(probs[:50], labels[:50])
    want = {"split": full.compute(), "only0": first50.compute(), "base": full.constant_baseline(0.3)}
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-6), (rank, key)
    assert want["split"]["count"] == 200


# -------------------------------------------------------------------------------------- retrieval
# Five items on a line: with d = 1, item i scores (4 - i) × user value, so a user of +1 ranks
# items 0,1,2,3,4 and a user of -1 ranks 4,3,2,1,0.
ITEMS = torch.tensor([[4.0], [3.0], [2.0], [1.0], [0.0]])
USERS = torch.tensor([[1.0], [-1.0], [1.0]])
TARGETS = {0: {1, 4}, 1: {4, 0}}  # user 2 has no targets: skipped
EXCLUDE = {1: {3}}  # user 1 saw item 3 in training: its list becomes 4,2,1,0


def test_retrieval_metrics_hand_computed() -> None:
    out = retrieval_metrics(USERS, ITEMS, TARGETS, EXCLUDE, ks=(1, 2, 5))
    assert out["users"] == 2
    # K=1  u0: [0] no hit.            u1: [4] hit at j=0: recall 1/2, DCG 1, IDCG(min(2,1)=1) = 1.
    assert out["recall@1"] == pytest.approx((0 + 0.5) / 2)
    assert out["hitrate@1"] == pytest.approx(0.5)
    assert out["ndcg@1"] == pytest.approx((0 + 1) / 2)
    # K=2  u0: [0,1] hit at j=1: DCG 1/log2 3, IDCG 1 + 1/log2 3.   u1: [4,2]: DCG 1, same IDCG.
    idcg2 = 1 + 1 / L2(3)
    assert out["recall@2"] == pytest.approx(0.5)
    assert out["hitrate@2"] == 1.0
    assert out["ndcg@2"] == pytest.approx(((1 / L2(3)) / idcg2 + 1 / idcg2) / 2)
    # K=5  u0: [0,1,2,3,4] hits at j=1,4.  u1: [4,2,1,0,-] hits at j=0,3 (one slot empty: 3 excluded).
    assert out["recall@5"] == 1.0
    assert out["ndcg@5"] == pytest.approx(((1 / L2(3) + 1 / L2(6)) / idcg2 + (1 + 1 / L2(5)) / idcg2) / 2)


def test_recall_divides_by_all_targets_not_k() -> None:
    # One user, 3 targets, K=1 and the top item is a target: recall = 1/3 (|targets|), ndcg = 1.
    out = retrieval_metrics(USERS[:1], ITEMS, {0: {0, 1, 2}}, ks=(1,))
    assert out["recall@1"] == pytest.approx(1 / 3) and out["ndcg@1"] == 1.0 and out["hitrate@1"] == 1.0


def test_exclusion_masks_seen_items_and_drops_unrankable_targets() -> None:
    # Without exclusion user 0 would get item 0 on top. Excluding it moves item 1 (a target) up.
    out = retrieval_metrics(USERS[:1], ITEMS, {0: {1}}, {0: {0}}, ks=(1,))
    assert out["recall@1"] == 1.0
    assert retrieval_metrics(USERS[:1], ITEMS, {0: {1}}, ks=(1,))["recall@1"] == 0.0
    # A target that is also excluded cannot be ranked: it leaves the denominator; a user left
    # with no target is not evaluated at all.
    out = retrieval_metrics(USERS[:2], ITEMS, {0: {0, 1}, 1: {2}}, {0: {0}, 1: {2}}, ks=(1,))
    assert out["users"] == 1 and out["recall@1"] == 1.0
    scores, rows = top_k(USERS, ITEMS, EXCLUDE, k=5)
    assert rows[1].tolist() == [4, 2, 1, 0, -1] and scores[1, -1] == -math.inf
    assert rows[0].tolist() == [0, 1, 2, 3, 4]
    # k beyond the catalogue is clamped; `users` picks rows and exclusion follows the row
    _, rows = top_k(USERS, ITEMS, EXCLUDE, k=9, users=[1])
    assert rows.tolist() == [[4, 2, 1, 0, -1]]


def test_unrankable_targets_stay_in_the_denominator() -> None:
    # User 0 ranks item 0 first (a target) and has one more relevant item unseen in training: it
    # counts as a miss, so recall@1 = 1/2 and IDCG@2 covers two relevant items.
    out = retrieval_metrics(USERS[:1], ITEMS, {0: {0}}, ks=(1, 2), unrankable=torch.tensor([1]))
    assert out["recall@1"] == pytest.approx(0.5) and out["hitrate@1"] == 1.0
    assert out["ndcg@2"] == pytest.approx(1 / (1 + 1 / L2(3)))
    # A user whose only relevant item is unrankable is still evaluated, with zeros.
    out = retrieval_metrics(USERS[:2], ITEMS, {0: {0}}, ks=(1,), unrankable=torch.tensor([0, 2]))
    assert out["users"] == 2 and out["recall@1"] == pytest.approx(0.5)


def test_ties_broken_by_lower_item_row() -> None:
    # Scores 5, 1, 1, 1, 0, 1: the k=2 boundary falls inside the tie of items 1, 2, 3, 5.
    items = torch.tensor([[5.0], [1.0], [1.0], [1.0], [0.0], [1.0]])
    _, rows = top_k(torch.tensor([[1.0]]), items, k=2)
    assert rows.tolist() == [[0, 1]]
    _, rows = top_k(torch.tensor([[1.0]]), items, {0: {1}}, k=3)
    assert rows.tolist() == [[0, 2, 3]]
    # Many ties at random: equal to a stable full sort (score desc, then item row asc).
    g = torch.Generator().manual_seed(0)
    user = torch.randint(0, 3, (40, 2), generator=g).float()
    item = torch.randint(0, 3, (300, 2), generator=g).float()
    scores, rows = top_k(user, item, k=25, batch_users=7)
    ref_scores, ref_rows = torch.sort(user @ item.T, dim=1, descending=True, stable=True)
    assert torch.equal(rows, ref_rows[:, :25]) and torch.equal(scores, ref_scores[:, :25])


def test_batching_and_csr_inputs_agree() -> None:
    import scipy.sparse

    g = torch.Generator().manual_seed(3)
    users, items = torch.randn(57, 8, generator=g), torch.randn(200, 8, generator=g)
    rng = np.random.default_rng(0)
    targets = {u: set(rng.choice(200, size=rng.integers(0, 6), replace=False).tolist()) for u in range(57)}
    seen = {u: set(rng.choice(200, size=10, replace=False).tolist()) for u in range(57)}
    ref = retrieval_metrics(users, items, targets, seen, ks=(10, 50, 100))

    def csr(sets: dict[int, set[int]]) -> Any:
        rows = [u for u, s in sets.items() for _ in s]
        cols = [i for s in sets.values() for i in s]
        return scipy.sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(57, 200))

    t_csr, s_csr = csr(targets), csr(seen)
    assert retrieval_metrics(users, items, t_csr, s_csr, batch_users=5) == pytest.approx(ref)
    pair = (t_csr.indptr, t_csr.indices)
    torch_csr = torch.sparse_csr_tensor(  # beta-API warning is expected
        torch.as_tensor(s_csr.indptr), torch.as_tensor(s_csr.indices), torch.ones(s_csr.nnz), (57, 200)
    )
    assert retrieval_metrics(users, items, pair, torch_csr, batch_users=1) == pytest.approx(ref)
    # Evaluating two disjoint user slices and combining them gives the whole.
    parts = [
        retrieval_metrics(users, items, targets, seen, users=range(a, b)) for a, b in ((0, 20), (20, 57))
    ]
    assert combine_retrieval(parts) == pytest.approx(ref)
    assert ref["users"] == sum(1 for s in targets.values() if s)


def test_bad_item_rows_are_reported() -> None:
    with pytest.raises(ValueError, match="targets: item row 7"):
        retrieval_metrics(USERS, ITEMS, {0: {7}})
    with pytest.raises(ValueError, match="exclude: user row 9"):
        retrieval_metrics(USERS, ITEMS, TARGETS, {9: {1}})


def test_popularity_baseline_hand_computed() -> None:
    counts = torch.tensor([5.0, 9.0, 9.0, 1.0, 0.0])  # order 1, 2 (tie → lower row first), 0, 3, 4
    targets = {0: {2}, 1: {0}}
    exclude = {0: {1}}  # user 0's list becomes 2, 0, 3, 4
    out = popularity_baseline(counts, targets, exclude, ks=(1, 3))
    # u0: hit at j=0.  u1: list 1, 2, 0: hit at j=2 (DCG 1/log2 4 = 0.5, IDCG 1).
    assert out["recall@1"] == 0.5 and out["hitrate@1"] == 0.5 and out["ndcg@1"] == 0.5
    assert out["recall@3"] == 1.0 and out["ndcg@3"] == pytest.approx((1 + 0.5) / 2)
    # The same ranking expressed as embeddings gives the same numbers.
    same = retrieval_metrics(torch.ones(2, 1), counts[:, None], targets, exclude, ks=(1, 3))
    assert same == pytest.approx(out)


@pytest.mark.gpu
def test_retrieval_and_ctr_metrics_on_cuda_match_cpu() -> None:
    g = torch.Generator().manual_seed(5)
    # float64 so CPU and GPU scores agree to the last float32 bit and near-ties rank alike.
    users = torch.randn(300, 16, generator=g, dtype=torch.float64)
    items = torch.randn(5000, 16, generator=g, dtype=torch.float64)
    rng = np.random.default_rng(1)
    targets = {u: set(rng.choice(5000, size=3, replace=False).tolist()) for u in range(300)}
    seen = {u: set(rng.choice(5000, size=20, replace=False).tolist()) for u in range(300)}
    cpu = retrieval_metrics(users, items, targets, seen, batch_users=64)
    gpu = retrieval_metrics(users.cuda(), items.cuda(), targets, seen, batch_users=64)
    assert gpu == pytest.approx(cpu, abs=1e-6)
    _, rows_cpu = top_k(users, items, seen, k=10)
    _, rows_gpu = top_k(users.cuda(), items.cuda(), seen, k=10)
    assert torch.equal(rows_cpu, rows_gpu)
    pytest.importorskip("torchmetrics")
    probs, labels = _ctr_data()
    a, b = CTRMetrics(), CTRMetrics(device="cuda")
    a.update(probs, labels)
    b.update(probs.cuda(), labels.cuda())
    assert b.compute() == pytest.approx(a.compute(), rel=1e-6)

"""EASE, the reference row of `recsys bench quality` (recsys/bench/ease.py): its closed form equals the
per-item ridge regressions it stands for, and scoring test reads the val items known then."""

from __future__ import annotations

import numpy as np
import torch

from recsys.bench.ease import ease_scores, ease_weights
from recsys.bench.quality import Split


def test_closed_form_is_each_items_ridge_regression_on_the_others() -> None:
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((40, 7)) < 0.35)
    lam = 3.0
    got = ease_weights(x, lam)
    xd = x.double()
    for j in range(x.shape[1]):
        others = [i for i in range(x.shape[1]) if i != j]
        a = xd[:, others]
        ref = torch.linalg.solve(a.T @ a + lam * torch.eye(len(others), dtype=torch.float64), a.T @ xd[:, j])
        assert torch.allclose(got[others, j], ref, atol=1e-10), j
        assert got[j, j] == 0.0


def test_test_scores_read_train_and_val_val_scores_train_only() -> None:
    pairs = lambda *p: np.array(p, dtype=np.int64).reshape(-1, 2)  # noqa: E731
    train = pairs((0, 0), (0, 1), (1, 1), (1, 2), (2, 0), (2, 2), (3, 3))
    split = Split(["a", "b", "c", "d"], list("wxyz"), train, pairs((3, 0)), pairs((3, 2)), ())
    known_test = split.mask("train") | split.mask("val")
    assert torch.allclose(
        ease_scores(split, "test", 1.0), (known_test.double() @ ease_weights(known_test, 1.0)).float()
    )
    val = ease_scores(split, "val", 1.0)
    assert torch.allclose(
        val, (split.mask("train").double() @ ease_weights(split.mask("train"), 1.0)).float()
    )
    # user 3's val item (0) co-occurs with item 2 in train: known at test, it lifts item 2 there only
    assert ease_scores(split, "test", 1.0)[3, 2] > val[3, 2]


def test_ranker_history_ease_equals_the_dense_fit_on_its_rows() -> None:
    """The candidate ranker's EASE weights (recsys.retrieval.candidates.history_of, from the co-occurrence
    counts it builds for its cosine features; duplicate pairs counted once) equal the dense fit."""
    from recsys.retrieval.candidates import history_of

    rng = np.random.default_rng(1)
    sparse = np.stack([rng.integers(0, 50, 400), rng.integers(0, 12, 400)], 1)  # many duplicate pairs
    dense = torch.zeros(50, 12, dtype=torch.bool)
    dense[sparse[:, 0], sparse[:, 1]] = True
    got = history_of(sparse, 0, 1, 50, 12, 3.0).ease
    assert got is not None and np.abs(got - ease_weights(dense, 3.0).float().numpy()).max() < 1e-6
    assert history_of(sparse, 0, 1, 50, 12).ease is None

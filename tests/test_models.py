"""Model shapes and losses (unit tier): Two-Tower towers and losses, log-Q correction, DLRM/DCN, LR schedule."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.models.dlrm import DLRMTask, build_dlrm
from recsys.models.two_tower import (
    TwoTower,
    TwoTowerTask,
    item_log_q,
    make_ebc,
    sampled_softmax_loss,
    tower_kjt,
)


def _kjt(cols: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    keys = list(cols)
    n = len(cols[keys[0]])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat([cols[k] for k in keys]),
        lengths=torch.ones(n * len(keys), dtype=torch.int32),
    )


def _two_tower(loss: str = "softmax", log_q: torch.Tensor | None = None) -> TwoTowerTask:
    torch.manual_seed(0)
    ebc = make_ebc([("user_id", 20), ("item_id", 10), ("item_cat", 4)], 8, device="cpu")
    tt = TwoTower(ebc, ["user_id"], ["item_id", "item_cat"], [16, 6], normalize=loss == "softmax")
    return TwoTowerTask(tt, "item_id", loss, 0.1, log_q)


def _batch(b: int = 5) -> Batch:
    g = torch.Generator().manual_seed(1)
    cols = {
        "user_id": torch.randint(0, 20, (b,), generator=g),
        "item_id": torch.arange(b) % 10,
        "item_cat": torch.randint(0, 4, (b,), generator=g),
    }
    return Batch(dense_features=torch.zeros(b, 0), sparse_features=_kjt(cols), labels=torch.ones(b))


def test_two_tower_shapes_and_normalisation() -> None:
    task = _two_tower()
    user, item = task.model(_batch().sparse_features)
    assert user.shape == (5, 6) and item.shape == (5, 6)
    assert torch.allclose(user.norm(dim=-1), torch.ones(5), atol=1e-5)
    loss, (detached, scores, labels) = task(_batch())
    assert loss.ndim == 0 and loss.requires_grad and not detached.requires_grad
    assert scores.shape == (5,) and torch.equal(labels, torch.ones(5))
    loss.backward()
    assert task.model.user_mlp[0].weight.grad is not None


def test_tower_embeddings_match_the_batch_forward() -> None:
    task = _two_tower("bce")
    b = _batch()
    user, item = task.model(b.sparse_features)
    kjt = b.sparse_features.to_dict()
    u = task.model.user_embeddings({"user_id": kjt["user_id"].values()})
    i = task.model.item_embeddings({"item_id": kjt["item_id"].values(), "item_cat": kjt["item_cat"].values()})
    assert torch.allclose(u, user, atol=1e-6) and torch.allclose(i, item, atol=1e-6)
    # empty bags for the other tower's keys pool to zeros and do not leak in
    k = tower_kjt(["a", "b"], {"b": torch.tensor([3, 4])})
    assert k.lengths().tolist() == [0, 0, 1, 1]


def test_bce_loss_is_pointwise_on_dot_products() -> None:
    task = _two_tower("bce")
    b = _batch()
    b = Batch(b.dense_features, b.sparse_features, torch.tensor([1.0, 0, 1, 0, 1]))
    loss, (_, scores, labels) = task(b)
    assert math.isclose(
        float(loss.detach()), float(F.binary_cross_entropy_with_logits(scores, labels)), rel_tol=1e-6
    )


def test_sampled_softmax_hand_case_and_log_q_effect() -> None:
    # Two users, two items; identity embeddings → logits/T = [[10, 0], [0, 10]] at T = 0.1.
    user = torch.eye(2)
    item = torch.eye(2)
    ids = torch.tensor([0, 1])
    labels = torch.ones(2)
    plain = sampled_softmax_loss(user, item, ids, labels, 0.1, None)
    expected = -math.log(math.exp(10) / (math.exp(10) + 1))
    assert math.isclose(float(plain), expected, abs_tol=1e-6)
    # Item 0 is 9× as frequent as item 1: logits lose log q, so item 0 (a frequent negative for
    # row 1) is pushed down and item 1 (a rare negative for row 0) up.
    log_q = torch.log(torch.tensor([0.9, 0.1]))
    corrected = sampled_softmax_loss(user, item, ids, labels, 0.1, log_q)
    row0 = -(10 - math.log(0.9)) + math.log(math.exp(10 - math.log(0.9)) + math.exp(0 - math.log(0.1)))
    row1 = -(10 - math.log(0.1)) + math.log(math.exp(0 - math.log(0.9)) + math.exp(10 - math.log(0.1)))
    assert math.isclose(float(corrected), (row0 + row1) / 2, abs_tol=1e-6)
    assert not math.isclose(float(corrected), float(plain), rel_tol=1e-3)


def test_sampled_softmax_masks_label_zero_rows_and_duplicate_items() -> None:
    user = torch.eye(3)
    item = torch.eye(3)
    # row 2 has label 0: it contributes no positive term, but its item stays a negative
    only_first_two = sampled_softmax_loss(
        user, item, torch.tensor([0, 1, 2]), torch.tensor([1.0, 1, 0]), 1.0, None
    )
    row = -1 + math.log(math.e + 2)
    assert math.isclose(float(only_first_two), row, rel_tol=1e-5)
    # the same item twice in a batch is not its own negative
    dup = sampled_softmax_loss(user, item, torch.tensor([0, 0, 2]), torch.ones(3), 1.0, None)
    full = sampled_softmax_loss(user, item, torch.tensor([0, 1, 2]), torch.ones(3), 1.0, None)
    assert float(dup) < float(full)
    # no positive row at all: zero loss that still back-propagates
    u = torch.eye(2, requires_grad=True)
    zero = sampled_softmax_loss(u, torch.eye(2), torch.tensor([0, 1]), torch.zeros(2), 1.0, None)
    zero.backward()
    assert float(zero) == 0.0 and u.grad is not None


def test_item_log_q_is_a_log_distribution() -> None:
    q = item_log_q(torch.tensor([0, 3, 1]))
    assert math.isclose(float(q.exp().sum()), 1.0, rel_tol=1e-6)
    assert float(q[1]) > float(q[2]) >= float(q[0])


@pytest.mark.parametrize("interaction", ["dot", "dcn"])
def test_dlrm_shapes_and_bce(interaction: str) -> None:
    torch.manual_seed(0)
    sparse = [(f"c{i}", 30) for i in range(3)]
    model = build_dlrm(sparse, 4, 8, [16, 8], [16, 1], interaction, 2, 4, ebc_device="cpu")
    task = DLRMTask(model)
    b = 6
    cols = {f"c{i}": torch.randint(0, 30, (b,)) for i in range(3)}
    labels = torch.tensor([1.0, 0, 1, 1, 0, 0])
    batch = Batch(dense_features=torch.rand(b, 4), sparse_features=_kjt(cols), labels=labels)
    loss, (_, logits, lab) = task(batch)
    assert logits.shape == (b,)
    assert math.isclose(float(loss), float(F.binary_cross_entropy_with_logits(logits, labels)), rel_tol=1e-6)
    loss.backward()


def test_dlrm_tables_start_on_meta_for_dmp() -> None:
    model = build_dlrm([("c0", 10)], 2, 4, [4], [2, 1], "dot")
    weight = model.sparse_arch.embedding_bag_collection.embedding_bags["t_c0"].weight
    assert weight.is_meta
    with pytest.raises(ValueError, match="dot or dcn"):
        build_dlrm([("c0", 10)], 2, 4, [4], [2, 1], "cross")


def test_lr_schedule_warmup_and_decay() -> None:
    from recsys.distributed import LRSchedule

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = LRSchedule(opt, warmup=4, decay="linear", total_steps=14)
    assert [round(s.factor(i), 3) for i in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.5, 0.0]
    c = LRSchedule(opt, warmup=0, decay="cosine", total_steps=10)
    assert math.isclose(c.factor(5), 0.5, abs_tol=1e-9) and math.isclose(c.factor(10), 0.0, abs_tol=1e-9)
    s.set(9)
    assert math.isclose(opt.param_groups[0]["lr"], 0.5)

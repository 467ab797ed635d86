"""History-aware models on the real Trainer: the Two-Tower pooling the history (mean, attention) and
model.kind sequential train past popularity on data where the next item follows from the last ones,
resume exactly from a mid-run checkpoint, and export user vectors from each user's full history."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.config import Config, config_from_dict
from recsys.data.prepare import prepare

ITEMS, USERS, EVENTS, L = 120, 48, 24, 5


def write_walks(path: Path, seed: int = 0) -> None:
    """Each user's events come in pairs: a random item r, then next(r), for one fixed random map `next`.
    The test event (each user's last) is next(the val event): only the history tells it; the user's
    other items are random, so neither an id-only model nor popularity (flat) can."""
    rng = np.random.default_rng(seed)
    after = rng.permutation(ITEMS)
    lines = []
    for u in range(USERS):
        firsts = rng.choice(ITEMS, EVENTS // 2, replace=False)
        seq = [int(x) for r in firsts for x in (r, after[r])]
        lines += [f"u{u},i{item},{1000 * u + t}\n" for t, item in enumerate(seq)]
    order = rng.permutation(len(lines))  # the file is not in time order
    path.write_text("user,item,ts\n" + "".join(lines[k] for k in order))


def make_cfg(src: Path, prepared: Path, tmp: Path, model: dict, *train: tuple[str, object]) -> Config:
    cfg = {
        "name": "seq-test",
        "data": {
            "source": {"kind": "table", "path": str(src), "user": "user", "item": "item",
                       "sparse": ["user", "item"], "timestamp": "ts"},
            "prepared_dir": str(prepared),
            "label": {"mode": "all_positive"},
            "split": {"mode": "leave_last_n", "n": 1},
            "block_size": 16,
            "history": {"length": L},
        },
        "model": {"embedding_dim": 16, **model},
        "train": {"batch_size": 64, "epochs": 6, "pipeline": False, "seed": 3,
                  "dense_optimizer": {"name": "adam", "lr": 0.01},
                  "sparse_optimizer": {"name": "rowwise_adagrad", "lr": 0.1},
                  "checkpoint": {"dir": str(tmp / "ckpt")}},
        "eval": {"ks": [10], "batch_size": 64},
        "tracking": {"enabled": False},
    }  # fmt: skip
    for dotted, value in train:
        node = cfg
        *path, last = dotted.split(".")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return config_from_dict(cfg)


SEQUENTIAL = {
    "kind": "sequential",
    "sequential": {"layers": 1, "heads": 2, "dropout": 0.1, "softmax": "full"},
}
SAMPLED = {
    "kind": "sequential",
    "sequential": {"layers": 1, "heads": 2, "dropout": 0.1, "num_uniform_negatives": 16},
}
#: The HSTU block (pointwise SiLU attention, gated), sampled softmax so resume covers the negatives too.
HSTU = {
    "kind": "sequential",
    "sequential": {"block": "hstu", "layers": 2, "heads": 2, "dropout": 0.1, "num_uniform_negatives": 16},
}


def two_tower(pooling: str) -> dict:
    return {"kind": "two_tower", "two_tower": {"user_features": ["user"], "item_features": ["item"],
                                               "layers": [16], "temperature": 0.1, "history_pooling": pooling}}  # fmt: skip


@pytest.fixture(scope="module")
def walks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return prepared_walks(tmp_path_factory, SEQUENTIAL)


def prepared_walks(tmp_path_factory: pytest.TempPathFactory, model: dict) -> tuple[Path, Path]:
    """(walks.csv, its prepared folder) for `model`, in a fresh temporary folder."""
    d = tmp_path_factory.mktemp("walks")
    write_walks(d / "walks.csv")
    prepare(make_cfg(d / "walks.csv", d / "prep", d, model), overwrite=False)
    return d / "walks.csv", d / "prep"


@pytest.mark.slow
@pytest.mark.parametrize(
    "name,model,bar",
    [("sequential full softmax", SEQUENTIAL, 0.5), ("sequential sampled softmax", SAMPLED, 0.5),
     ("sequential hstu", HSTU, 0.5),
     ("two-tower attention", two_tower("attention"), 0.5),
     ("two-tower mean", two_tower("mean"), 0.2)],  # the mean dilutes the last item with 4 random ones
)  # fmt: skip
def test_history_models_train_past_popularity(
    walks, tmp_path: Path, name: str, model: dict, bar: float
) -> None:  # noqa: ANN001
    from recsys.train import train

    src, prep = walks
    res = train(make_cfg(src, prep, tmp_path, model), resume="never")
    # popularity is flat here (~10 of the ~100 unseen items); the test item follows from the last one
    print(name, "test hitrate@10", res.metrics["hitrate@10"], "popularity", res.baselines["hitrate@10"])
    assert res.metrics["hitrate@10"] > bar and res.baselines["hitrate@10"] < 0.1, (name, res.metrics)


@pytest.mark.slow
@pytest.mark.parametrize("model", [SAMPLED, HSTU], ids=["sasrec", "hstu"])
def test_sequential_resumes_exactly_from_a_mid_run_checkpoint(walks, tmp_path: Path, model: dict) -> None:  # noqa: ANN001
    from recsys.checkpoint import complete_checkpoints
    from recsys.train import train

    src, prep = walks
    every = ("train.checkpoint.every_steps", 7)
    ref = train(make_cfg(src, prep, tmp_path / "ref", model, every, ("train.epochs", 3)), resume="never")
    part = make_cfg(src, prep, tmp_path / "res", model, every, ("train.epochs", 3), ("train.max_steps", 14))
    assert train(part, resume="never").steps == 14 < ref.steps
    (run_dir,) = (tmp_path / "res" / "ckpt").glob("run-*")
    step = [c for c in complete_checkpoints(run_dir) if c.step == 14][0]
    full = make_cfg(src, prep, tmp_path / "res", model, every, ("train.epochs", 3))
    res = train(full, resume=str(step.path))
    assert res.resumed_from == 14 and res.steps == ref.steps
    for k in ("loss", "hitrate@10", "ndcg@10", "auroc"):
        assert res.metrics[k] == pytest.approx(ref.metrics[k], rel=1e-5, abs=1e-6), k


@pytest.mark.parametrize("model", [SEQUENTIAL, HSTU], ids=["sasrec", "hstu"])
def test_exported_user_vectors_come_from_the_full_history(walks, tmp_path: Path, model: dict) -> None:  # noqa: ANN001
    """user_histories(split=None) is each user's last L items over every split (the test item
    included); with a split, the history before that user's first row there."""
    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata, read_vocab
    from recsys.evaluate import read_all_splits, retrieval_embeddings, user_histories
    from recsys.models.task import build_task

    src, prep = walks
    cfg = make_cfg(src, prep, tmp_path, model)
    meta = read_metadata(prep)
    arrays = read_all_splits(cfg, meta)
    users = read_vocab(prep, meta.sparse_features[meta.sparse_index("user")])
    items = read_vocab(prep, meta.sparse_features[meta.sparse_index("item")])
    events: dict[str, list[tuple[int, str]]] = {}
    for line in src.read_text().splitlines()[1:]:
        u, i, t = line.split(",")
        events.setdefault(u, []).append((int(t), i))
    full, lengths = user_histories(meta, arrays, None)
    before_test, test_lengths = user_histories(meta, arrays, "test")
    for row in range(1, len(users)):
        seq = [i for _, i in sorted(events[users[row]])]
        assert [items[r] for r in full[row, : lengths[row]]] == seq[-L:]
        assert [items[r] for r in before_test[row, : test_lengths[row]]] == seq[:-1][-L:]
    torch.manual_seed(0)
    task = build_task(cfg, meta, ebc_device="cpu", training=False).eval()
    emb = retrieval_embeddings(task, cfg, meta, arrays)
    one = task.model.user_embeddings({}, (full[3:4], lengths[3:4]))
    assert torch.allclose(emb["user"][3], one[0], atol=1e-6)
    assert read_split_arrays(prep, "test", meta)["history"].shape[1] == L


def test_warm_start_of_a_history_model_is_refused_with_one_line(walks, tmp_path: Path) -> None:  # noqa: ANN001
    """Warm start copies EmbeddingBagCollection tables; a history model's shared item table is not one,
    so init_from stops before training instead of leaving that table silently fresh."""
    from recsys.checkpoint import complete_checkpoints
    from recsys.errors import UserError
    from recsys.train import train

    src, prep = walks
    short = (("train.epochs", 1), ("train.max_steps", 2), ("train.checkpoint.every_steps", 2))
    train(make_cfg(src, prep, tmp_path / "parent", SEQUENTIAL, *short), resume="never")
    (run_dir,) = (tmp_path / "parent" / "ckpt").glob("run-*")
    ckpt = complete_checkpoints(run_dir)[-1].path
    child = make_cfg(src, prep, tmp_path / "child", SEQUENTIAL, *short, ("train.init_from", str(ckpt)))
    with pytest.raises(UserError, match="item.*not available for models reading data.history"):
        train(child, resume="never")


def test_hstu_encoder_reads_only_the_valid_history(walks, tmp_path: Path) -> None:  # noqa: ANN001
    """block: hstu builds the HSTU encoder; a user's vector does not change with what sits after its
    last item (padding, or later events), and does change with its items."""
    from recsys.data.metadata import read_metadata
    from recsys.models.hstu import HSTUEncoder
    from recsys.models.task import build_task

    src, prep = walks
    cfg = make_cfg(src, prep, tmp_path, HSTU)
    task = build_task(cfg, read_metadata(prep), ebc_device="cpu", training=False).eval()
    enc = task.model.history
    assert isinstance(enc, HSTUEncoder)
    torch.manual_seed(0)
    x, lengths = torch.randn(3, L, 16), torch.tensor([0, 2, L])
    after = x.clone()
    after[0], after[1, 2:] = 7.0, -3.0  # user 0 has no items, user 1 two: the rest is not theirs
    assert torch.allclose(enc(x, lengths, None), enc(after, lengths, None), atol=1e-6)
    changed = x.clone()
    changed[1, 0] = torch.randn(16)  # its older item (a constant shift would vanish in LayerNorm)
    assert not torch.allclose(enc(x, lengths, None)[1], enc(changed, lengths, None)[1])

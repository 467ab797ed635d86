"""Two-Tower quality mechanisms (unit tier) on hand-made tensors: embedding L2, dot vs cosine, uniform
negatives with their log-Q correction; and a slow smoke run of `recsys bench quality --quick`."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.config import load_config
from recsys.models.task import similarity_normalizes
from recsys.models.two_tower import TwoTower, TwoTowerTask, make_ebc, sampled_softmax_loss

FEATURES = [("user_id", 20), ("item_id", 10), ("item_cat", 4)]


def _task(normalize: bool = True, **kw: object) -> TwoTowerTask:
    torch.manual_seed(0)
    ebc = make_ebc(FEATURES, 8, device="cpu")
    tt = TwoTower(ebc, ["user_id"], ["item_id", "item_cat"], [16, 6], normalize=normalize)
    return TwoTowerTask(tt, "item_id", "softmax", 0.1, None, **kw)  # type: ignore[arg-type]


def _batch() -> Batch:
    cols = {
        "user_id": torch.tensor([3, 7, 11, 3]),
        "item_id": torch.tensor([1, 2, 5, 9]),
        "item_cat": torch.tensor([0, 1, 1, 3]),
    }
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(cols), values=torch.cat(list(cols.values())), lengths=torch.ones(12, dtype=torch.int32)
    )
    return Batch(dense_features=torch.zeros(4, 0), sparse_features=kjt, labels=torch.ones(4))


def test_embedding_l2_adds_lambda_times_mean_squared_norm_of_looked_up_rows() -> None:
    plain, lam = _task(), 0.3
    penalised = _task(embedding_l2=lam)
    b = _batch()
    base, _ = plain(b)
    loss, _ = penalised(b)
    # By hand: each row's looked-up table rows (one id per feature, sum pooling = the row itself).
    w = {name: penalised.model.ebc.embedding_bags[f"t_{name}"].weight for name, _ in FEATURES}
    ids = b.sparse_features.to_dict()
    per_row = sum(w[f][ids[f].values()].pow(2).sum(-1) for f in ("user_id", "item_id", "item_cat"))
    assert torch.allclose(loss - base, lam * per_row.mean(), atol=1e-6)
    loss.backward()  # the penalty reaches the tables
    assert penalised.model.ebc.embedding_bags["t_item_cat"].weight.grad is not None


def test_dot_keeps_raw_tower_outputs_and_cosine_normalises() -> None:
    b = _batch().sparse_features
    u_dot, i_dot = _task(normalize=False).model(b)
    u_cos, i_cos = _task(normalize=True).model(b)  # same seed: same weights
    assert torch.allclose(u_cos, F.normalize(u_dot, dim=-1), atol=1e-6)
    assert torch.allclose(i_cos, F.normalize(i_dot, dim=-1), atol=1e-6)
    assert not torch.allclose(u_dot.norm(dim=-1), torch.ones(4))
    # The config switch: auto keeps today's behaviour (cosine for softmax, dot for bce).
    cases = {
        ("softmax", "auto"): True,
        ("bce", "auto"): False,
        ("softmax", "dot"): False,
        ("bce", "cosine"): True,
    }
    for (loss, sim), want in cases.items():
        cfg = load_config(
            "movielens_100k_recbole", [f"model.two_tower.loss={loss}", f"model.two_tower.similarity={sim}"]
        )
        assert similarity_normalizes(cfg) is want


def test_uniform_negatives_log_q_correction_per_source() -> None:
    # 2 users/items with identity embeddings; 2 uniform negatives: item 1 (also row 1's positive) and 7.
    user, item = torch.eye(3)[:2], torch.eye(3)[:2]
    ids, labels = torch.tensor([0, 1]), torch.ones(2)
    neg = torch.tensor([[0.0, 1.0, 0.0], [0.5, 0.0, 1.0]])
    neg_ids = torch.tensor([1, 7])
    log_q = torch.log(torch.tensor([0.9, 0.1]))
    m, n = 2, 50
    got = sampled_softmax_loss(user, item, ids, labels, 1.0, log_q, neg, neg_ids, math.log(m / n))
    b = 2
    rows = []
    for r in range(2):
        # in-batch columns lose log(B·q_pop); uniform columns lose log(M/N); a draw equal to the
        # row's own positive is masked.
        inb = [float(user[r] @ item[j]) - math.log(b * float(log_q[j].exp())) for j in range(2)]
        uni = [float(user[r] @ neg[j]) - math.log(m / n) for j in range(2) if int(neg_ids[j]) != int(ids[r])]
        logits = inb + uni
        rows.append(-logits[r] + math.log(sum(math.exp(x) for x in logits)))
    assert math.isclose(float(got), sum(rows) / 2, abs_tol=1e-5)
    # In-batch only: the log(B) shift is a constant per row and changes nothing.
    shifted = sampled_softmax_loss(user, item, ids, labels, 1.0, log_q)
    logits = user @ item.T - log_q.unsqueeze(0)
    assert math.isclose(float(shifted), float(F.cross_entropy(logits, ids)), abs_tol=1e-6)


def test_task_draws_uniform_negatives_only_while_training() -> None:
    rows = torch.stack([torch.arange(10), torch.arange(10) % 4], 1)  # item row → (item_id, item_cat)
    task = _task(num_uniform_negatives=64, item_rows=rows)
    plain = _task()
    b = _batch()
    emb, ids, log_q = task._uniform_negatives()
    assert emb.shape == (64, 6) and ids.shape == (64,)
    assert int(ids.min()) >= 1 and int(ids.max()) <= 9  # rows 1..N: the OOV row is never a negative
    assert math.isclose(log_q or 0.0, math.log(64 / 9))
    train_loss, _ = task(b)
    assert float(train_loss.detach()) > float(plain(b)[0].detach())  # more negatives: a harder softmax
    task.eval()
    assert torch.allclose(task(b)[0], plain.eval()(b)[0])  # evaluation: in-batch only, deterministic


def test_shipped_ml100k_config_is_a_bench_quality_candidate() -> None:
    """Each shipped ML-100K config holds exactly one of the bench's Two-Tower candidates: the one val
    chose (VAL_CHOICE), whose val nDCG@10 its header comment states. A setting changed in the config or
    in the grid only shows here."""
    from importlib import resources

    from recsys.bench.quality import CONFIGS, TT_GRID, VAL_CHOICE, shipped_differences

    for config in CONFIGS:
        index, val = VAL_CHOICE[config]
        matches = [n for n, c in enumerate(TT_GRID) if not shipped_differences(c, config)]
        assert matches == [index], (config, [shipped_differences(c, config) for c in TT_GRID])
        header = resources.files("recsys.configs").joinpath(f"{config}.yaml").read_text()
        assert f"val nDCG@10 {val:.4f}" in header or f"val {val:.4f}" in header, config
    shipped = load_config("movielens_100k_recbole").model.two_tower.temperature
    assert shipped_differences({"model.two_tower.temperature": 0.77}) == [
        f"model.two_tower.temperature: {shipped!r} → 0.77"
    ]


@pytest.mark.slow
def test_bench_quality_quick_smoke(tmp_path: Path, ml100k_recbole: Path) -> None:
    from recsys.bench.quality import ABLATIONS

    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "RECSYS_TEST_DATA": str(ml100k_recbole.parent)}  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "recsys", "bench", "quality", "--quick"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        m = re.match(r"^(popularity|bpr-mf|ease|two-tower\S*)\s+(.*)$", line)
        if m and "±" in line:
            rows[m.group(1)] = [float(x) for x in re.findall(r"\d+\.\d+(?= ±)", m.group(2))]
    names = {"popularity", "bpr-mf", "two-tower-default", "two-tower", "ease", "two-tower-history"}
    assert set(rows) == names, proc.stdout
    assert re.search(r"two-tower-history vs two-tower: nDCG@10 [\d.]+×, Recall@10 [\d.]+×", proc.stdout)
    # EASE is deterministic and needs no epochs, so even --quick gives its full figure (λ 300 on val)
    assert re.search(r"ease: chosen λ 300\b", proc.stdout) and abs(rows["ease"][0] - 0.3458) < 5e-5, rows
    for values in rows.values():
        assert len(values) == 4 and all(0.0 <= v <= 1.0 for v in values)
    # The popularity row against numpy: its test recall and precision@10 lie within what any order of
    # tied counts gives (a narrow interval), so a wrong split, exclusion or metric shows.
    (rec_lo, rec_hi), (prec_lo, prec_hi) = _popularity_bounds(ml100k_recbole / "ml-100k.inter")
    assert rec_hi - rec_lo < 0.01 and prec_hi - prec_lo < 0.01, (rec_lo, rec_hi, prec_lo, prec_hi)
    _, recall, precision, _ = rows["popularity"]
    assert rec_lo - 5e-5 <= recall <= rec_hi + 5e-5, (recall, rec_lo, rec_hi)
    assert prec_lo - 5e-5 <= precision <= prec_hi + 5e-5, (precision, prec_lo, prec_hi)
    ablation = re.findall(r"^  (.+?)\s+(\d\.\d{4}) +[+-]\d+\.\d%$", proc.stdout, flags=re.M)
    assert [name for name, _ in ablation] == ["chosen", *ABLATIONS], proc.stdout[-3000:]


def _popularity_bounds(inter: Path) -> tuple[tuple[float, float], tuple[float, float]]:
    """(recall@10, precision@10) intervals of the popularity list on the bench's test split, over every
    order of tied train counts: each user's train and val items removed, items without train rows
    never listed, users with a test item averaged (numpy, from the split's pairs)."""
    import numpy as np

    from recsys.bench.quality import random_split_of

    split = random_split_of(inter)
    counts = np.bincount(split.train[:, 1], minlength=len(split.item_ids))
    known: dict[int, set[int]] = {}
    for u, i in np.concatenate([split.train, split.val]).tolist():
        known.setdefault(u, set()).add(i)
    tests: dict[int, list[int]] = {}
    for u, i in split.test.tolist():
        tests.setdefault(u, []).append(i)
    rec, prec = [], []
    for u, items in tests.items():
        listed = counts > 0
        listed[list(known.get(u, ()))] = False
        c = counts[listed]
        # A listed item of count n sits between 1 + #(count > n) and #(count >= n).
        best = np.array([1 + int((c > counts[i]).sum()) if counts[i] > 0 else 10**9 for i in items])
        worst = np.array([int((c >= counts[i]).sum()) if counts[i] > 0 else 10**9 for i in items])
        lo, hi = int((worst <= 10).sum()), int((best <= 10).sum())
        rec.append((lo / len(items), hi / len(items)))
        prec.append((lo / 10, hi / 10))
    r, p = np.array(rec), np.array(prec)
    return (float(r[:, 0].mean()), float(r[:, 1].mean())), (float(p[:, 0].mean()), float(p[:, 1].mean()))


def test_popularity_prior_reaches_the_exported_embeddings(tmp_path: Path) -> None:
    """A run with popularity_prior β exports vectors whose extra coordinate carries the prior (users: 1,
    items: β·τ·log train share), so the index, batch recommendations and serving rank by it too."""
    import numpy as np
    import pandas as pd
    from conftest import TINY_TWO_TOWER

    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.data.prepare import prepare
    from recsys.retrieval.runs import download
    from recsys.train import train

    beta, uri = 0.5, f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = [*TINY_TWO_TOWER, "train.epochs=1", f"data.prepared_dir={tmp_path / 'd'}",
            f"train.checkpoint.dir={tmp_path / 'ckpt'}", f"tracking.uri={uri}",
            f"model.two_tower.popularity_prior={beta}"]  # fmt: skip
    cfg = load_config("two_tower_synth", sets)
    prepare(cfg, overwrite=False)
    result = train(cfg, resume="never")
    side = {s: pd.read_parquet(download(result.run_id, uri, f"embeddings/{s}_embeddings.parquet", str(tmp_path)))
            for s in ("user", "item")}  # fmt: skip
    users, items = (np.stack(side[s]["embedding"].to_numpy()) for s in ("user", "item"))
    assert users.shape[1] == items.shape[1] == cfg.model.two_tower.layers[-1] + 1
    assert np.all(users[:, -1] == 1.0)
    meta = read_metadata(cfg.data.prepared_dir)
    train = read_split_arrays(cfg.data.prepared_dir, "train", meta)
    rows = train["sparse"][train["label"] > 0, meta.sparse_index("item_id")]  # train positives per item row
    counts = np.maximum(np.bincount(rows, minlength=len(items) + 1), 1).astype(float)
    counts[0] = 1  # the OOV row counts as the rarest item (it is never recommended)
    want = beta * cfg.model.two_tower.temperature * np.log(counts / counts.sum())[side["item"]["row"]]
    assert np.allclose(items[:, -1], want, atol=1e-5)

"""Synthetic raw data: Criteo layout with a hidden model (Bayes AUC recorded), planted interactions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from recsys.config import load_config
from recsys.data import readers as R
from recsys.data.synth import auc, synthesize
from recsys.errors import UserError


def test_auc_matches_pair_counting() -> None:
    rng = np.random.default_rng(0)
    s, y = rng.integers(0, 5, 200).astype(float), rng.integers(0, 2, 200)
    pos, neg = s[y == 1], s[y == 0]
    pairs = (pos[:, None] > neg[None, :]).mean() + 0.5 * (pos[:, None] == neg[None, :]).mean()
    assert auc(s, y) == pytest.approx(pairs)


def test_synthetic_ctr_is_criteo_layout_with_bayes_auc(tmp_path: Path) -> None:
    cfg = load_config(
        "dlrm_synth", [f"data.prepared_dir={tmp_path}", "data.source.rows=3000", "data.source.cardinality=40"]
    )
    synthesize(cfg, overwrite=False)
    raw = tmp_path / "raw"
    lines = (raw / "day_0.tsv").read_text().splitlines()
    assert len(lines) == 1000
    fields = [line.split("\t") for line in lines]
    assert {len(f) for f in fields} == {40}
    assert {f[0] for f in fields} == {"0", "1"}
    cats = [c for f in fields for c in f[14:]]
    assert "" in cats and all(len(c) == 8 and int(c, 16) >= 0 for c in cats if c)  # hex, some empty
    assert any(f[j] == "" for f in fields for j in range(1, 14))  # some missing ints
    facts = json.loads((raw / "synth.json").read_text())
    p = np.load(raw / "true_ctr.npy")
    labels = R.read_criteo([raw / f"day_{d}.tsv" for d in range(3)], False).label
    assert facts["bayes_auc"] == pytest.approx(auc(p, labels)) and 0.7 < facts["bayes_auc"] < 0.95
    assert set(facts["bayes_auc_by_day"]) == {"day_0", "day_1", "day_2"}
    assert 0.15 < facts["positive_rate"] < 0.45
    with pytest.raises(UserError, match="--overwrite"):
        synthesize(cfg, overwrite=False)
    before = (raw / "day_2.tsv").read_bytes()
    synthesize(cfg, overwrite=True)
    assert (raw / "day_2.tsv").read_bytes() == before  # seeded: same bytes


def test_synthetic_interactions_have_planted_structure(tmp_path: Path) -> None:
    cfg = load_config(
        "two_tower_synth",
        [f"data.prepared_dir={tmp_path}", "data.source.num_users=150", "data.source.num_items=500"],
    )
    synthesize(cfg, overwrite=False)
    t = R.read_table(
        tmp_path / "raw/interactions.csv",
        label="rating",
        dense=[],
        sparse=[],
        timestamp="timestamp",
        user="user_id",
        item="item_id",
        skip_bad_rows=False,
    )
    assert t.rows > 150 * 30 and set(np.unique(t.label)) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.all(np.diff(t.timestamp) >= 0)  # rows in time order
    users = np.array(t.sparse[0].to_pylist())
    items = np.array(t.sparse[1].to_pylist())
    pairs = set(zip(users.tolist(), items.tolist(), strict=True))
    assert len(pairs) == t.rows  # no repeated (user, item)
    counts = np.unique(items, return_counts=True)[1]
    assert counts.max() > 5 * np.median(counts)  # popularity skew
    facts = json.loads((tmp_path / "raw/synth.json").read_text())
    assert facts["oracle_recall_at_10"] > 3 * facts["popularity_recall_at_10"]


def test_synth_refuses_non_synthetic_source(tmp_path: Path) -> None:
    cfg = load_config("movielens_100k", [f"data.prepared_dir={tmp_path}"])
    with pytest.raises(UserError, match="synthetic_ctr or synthetic_interactions"):
        synthesize(cfg, overwrite=False)

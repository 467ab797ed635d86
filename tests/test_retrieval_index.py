"""FAISS item indexes: exact search equals brute force, IVF/HNSW recall on trained-like (clustered)
embeddings, save/load keeps the raw ids and the search settings, bad parameters are one line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from recsys.bench.recommend import clustered_embeddings
from recsys.errors import UserError
from recsys.retrieval.index import (
    IndexParams,
    ItemIndex,
    build_index,
    default_nlist,
    recall_at_k,
)


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """5,000 clustered items and 300 users (dim 32), and raw ids that are not positions."""
    items, users = clustered_embeddings(5000, 300, dim=32, clusters=100, rank=8, seed=3)
    ids = np.array([f"item-{i:05d}" for i in range(len(items))][::-1], dtype=object)
    return items, users, ids


def _brute_force(items: np.ndarray, users: np.ndarray, k: int) -> np.ndarray:
    scores = users.astype(np.float64) @ items.astype(np.float64).T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def test_exact_index_is_brute_force(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, users, ids = data
    idx = build_index(items, ids, queries=users)
    scores, found = idx.search(users, 50)
    truth = _brute_force(items, users, 50)
    assert recall_at_k(found, truth) == 1.0
    assert idx.facts["recall_at_100"] == 1.0 and idx.exact
    np.testing.assert_allclose(scores, np.take_along_axis(users @ items.T, found, 1), rtol=1e-5, atol=1e-5)
    assert (np.diff(scores, axis=1) <= 1e-6).all()  # best first


@pytest.mark.parametrize(
    "params",
    [IndexParams("ivf", nprobe=16), IndexParams("hnsw", m=16, ef_search=128)],
    ids=["ivf", "hnsw"],
)
def test_approximate_recall_is_measured_and_reasonable(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], params: IndexParams
) -> None:
    items, users, ids = data
    idx = build_index(items, ids, params, queries=users, recall_k=100)
    _, found = idx.search(users, 100)
    measured = recall_at_k(found, _brute_force(items, users, 100))
    assert idx.facts["recall_at_100"] == pytest.approx(measured, abs=1e-3)
    assert idx.facts["recall_queries"] == len(users)
    assert 0.9 <= measured <= 1.0, measured


def test_ivf_recall_grows_with_nprobe(data: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
    items, users, ids = data
    recalls = [
        build_index(items, ids, IndexParams("ivf", nprobe=p), queries=users).facts["recall_at_100"]
        for p in (1, 4, 16)
    ]
    assert recalls == sorted(recalls) and recalls[0] < recalls[-1], recalls


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_save_load_round_trip_keeps_ids_and_settings(
    data: tuple[np.ndarray, np.ndarray, np.ndarray], kind: str, tmp_path: Path
) -> None:
    items, users, ids = data
    rows = np.arange(1, len(items) + 1)
    idx = build_index(items, ids, IndexParams(kind, nprobe=6, ef_search=40), item_rows=rows, queries=users)
    loaded = ItemIndex.load(idx.save(tmp_path / "index"))
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [
        "index.faiss",
        "item_ids.parquet",
        "manifest.json",
    ]
    assert list(loaded.item_ids) == list(ids) and (loaded.item_rows == rows).all()
    assert loaded.params == idx.params and loaded.facts["recall_at_100"] == idx.facts["recall_at_100"]
    s1, f1 = idx.search(users, 20)
    s2, f2 = loaded.search(users, 20)
    np.testing.assert_array_equal(f1, f2)
    np.testing.assert_allclose(s1, s2)
    # Raw ids of the results, not positions, are what comes back to the caller.
    assert loaded.item_ids[f2[0, 0]] == ids[f1[0, 0]]


def test_search_deeper_than_the_catalogue_pads_with_minus_one() -> None:
    items, users = clustered_embeddings(30, 4, dim=8, clusters=3, rank=4)
    idx = build_index(items, [str(i) for i in range(30)])
    _, found = idx.search(users, 50)
    assert found.shape == (4, 30) and (found >= 0).all()


def test_default_nlist_keeps_39_points_per_list() -> None:
    assert default_nlist(1_000_000) == 4000
    assert default_nlist(500) == 12
    assert default_nlist(10) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"params": IndexParams("annoy")}, "index kind 'annoy'"),
        ({"params": IndexParams("ivf", nprobe=0)}, "nprobe must be >= 1"),
        ({"item_ids": ["a"]}, "1 item ids for 40 embeddings"),
        ({"vectors": np.zeros((0, 8), np.float32), "item_ids": []}, "non-empty"),
    ],
)
def test_bad_parameters_are_one_line(kwargs: dict, message: str) -> None:
    args = {"vectors": np.ones((40, 8), np.float32), "item_ids": [str(i) for i in range(40)], **kwargs}
    with pytest.raises(UserError, match=message) as e:
        build_index(**args)
    assert "\n" not in str(e.value)


def test_load_of_a_folder_without_an_index_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no index.faiss"):
        ItemIndex.load(tmp_path)

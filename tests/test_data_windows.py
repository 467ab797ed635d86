"""Windows of data: prepare [since, until) of a MovieLens-like source; vocabularies grow across windows.

The test writes its own u.data / u.user / u.item (timestamps 1000 … 1599), prepares consecutive
windows with data.window.previous and checks: each window holds exactly its rows; every id of the
previous window keeps its row (the vocabulary file's prefix is byte-identical); new ids are appended in
count order; OOV stays row 0; the metadata chain; the earlier folder is not touched.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from recsys.config import ConfigError, load_config
from recsys.data.lineage import metadata_sha256
from recsys.data.loader import read_split_arrays
from recsys.data.metadata import OOV_TOKEN, SPLITS, read_metadata, read_vocab
from recsys.data.prepare import prepare
from recsys.data.readers import ML100K_GENRES
from recsys.errors import UserError

FEATURES = ["user_id", "item_id", "age", "gender", "occupation", "genre_0", "genre_1", "genre_2", "year"]


def write_source(d: Path, rows: int = 600, seed: int = 0) -> list[tuple[str, str, int]]:
    """u.data of `rows` ratings at timestamps 1000 … 1000+rows-1 (shuffled file order); users and items
    grow with time (later rows draw from larger id ranges), so later windows bring new ids."""
    rng = np.random.default_rng(seed)
    ratings = []
    for k in range(rows):
        ts = 1000 + k
        users, items = 10 + k // 20, 15 + k // 12  # the id ranges widen as time goes on
        ratings.append((str(rng.integers(1, users + 1)), str(rng.integers(1, items + 1)), ts))
    order = rng.permutation(rows)  # file order is not time order
    lines = [f"{ratings[i][0]}\t{ratings[i][1]}\t{1 + i % 5}\t{ratings[i][2]}" for i in order]
    (d / "u.data").write_text("\n".join(lines) + "\n")
    n_users = 10 + rows // 20
    occupations = ["artist", "doctor", "engineer"]
    (d / "u.user").write_text(
        "".join(
            f"{u}|{18 + u % 50}|{'MF'[u % 2]}|{occupations[u % 3]}|0000{u}\n" for u in range(1, n_users + 1)
        )
    )
    n_items = 15 + rows // 12
    items = []
    for i in range(1, n_items + 1):
        flags = "|".join("1" if (i + j) % 7 == 0 else "0" for j in range(len(ML100K_GENRES)))
        items.append(f"{i}|Movie {i} ({1990 + i % 9})|01-Jan-{1990 + i % 9}||http://x|{flags}")
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return ratings


def config(d: Path, out: Path, *sets: str):
    """The shipped movielens_100k config on the test's files, small blocks."""
    return load_config("movielens_100k", [*config_sets(d, out), *sets])


def config_sets(d: Path, out: Path) -> list[str]:
    """The --set overrides of `config`."""
    return [
        f"data.source.path={d / 'u.data'}",
        f"data.source.users={d / 'u.user'}",
        f"data.source.items={d / 'u.item'}",
        f"data.prepared_dir={out}",
        "data.block_size=8",
        "data.chunk_rows=97",  # several chunks, cut across the window's bounds
        "train.batch_size=16",
        "eval.batch_size=16",
    ]


def checksums(folder: Path) -> dict[str, str]:
    """sha256 of every file under a folder."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def pairs(folder: Path) -> Counter:
    """(user id, item id) of every row of every split, decoded through the folder's vocabularies."""
    meta = read_metadata(folder)
    vocab = {f.name: read_vocab(folder, f) for f in meta.sparse_features}
    u, i = meta.sparse_index("user_id"), meta.sparse_index("item_id")
    out: Counter = Counter()
    for split in SPLITS:
        sparse = read_split_arrays(folder, split, meta)["sparse"]
        out.update(
            zip(
                (vocab["user_id"][r] for r in sparse[:, u]),
                (vocab["item_id"][r] for r in sparse[:, i]),
                strict=True,
            )
        )
    return out


@pytest.fixture(scope="module")
def windows(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[tuple[str, str, int]], list[Path]]:
    """Three consecutive windows [1000, 1200), [1200, 1400), [1400, 1600), each extending the one before."""
    d = tmp_path_factory.mktemp("ml")
    ratings = write_source(d)
    folders = [d / "w1", d / "w2", d / "w3"]
    prepare(config(d, folders[0], "data.window.since=1000", "data.window.until=1200"), overwrite=False)
    prepare(
        config(
            d,
            folders[1],
            "data.window.since=1200",
            "data.window.until=1400",
            f"data.window.previous={folders[0]}",
        ),
        overwrite=False,
    )
    prepare(
        config(d, folders[2], "data.window.since=1400", f"data.window.previous={folders[1]}"), overwrite=False
    )
    return d, ratings, folders


def test_window_holds_exactly_its_rows(windows) -> None:
    _, ratings, folders = windows
    for folder, (lo, hi) in zip(folders, [(1000, 1200), (1200, 1400), (1400, 10**9)], strict=True):
        want = Counter((u, i) for u, i, ts in ratings if lo <= ts < hi)
        got = pairs(folder)
        # Ids that only val/test saw decode as OOV; everything else must match row for row.
        assert sum(got.values()) == sum(want.values())
        assert {k: v for k, v in got.items() if OOV_TOKEN not in k} == {
            k: v for k, v in want.items() if k in got
        }
        w = read_metadata(folder).window
        assert w is not None and w.rows_in_window == sum(want.values())
        assert w.rows_before + w.rows_after + w.rows_in_window == len(ratings)


def test_vocabularies_grow_old_rows_kept(windows) -> None:
    _, ratings, folders = windows
    for old, new in zip(folders, folders[1:], strict=False):
        m_old, m_new = read_metadata(old), read_metadata(new)
        for f_old, f_new in zip(m_old.sparse_features, m_new.sparse_features, strict=True):
            a, b = (old / f_old.vocab_file).read_bytes(), (new / f_new.vocab_file).read_bytes()
            assert b.startswith(a), f_old.name  # every old id keeps its row, byte for byte
            ids_old, ids_new = read_vocab(old, f_old), read_vocab(new, f_new)
            assert ids_new[0] == OOV_TOKEN
            added = ids_new[len(ids_old) :]
            assert not set(added) & set(ids_old)
            assert m_new.window.rows_inherited[f_new.name] == len(ids_old) - 1
            assert m_new.window.rows_added[f_new.name] == len(added)
        # The new item ids: exactly the train items of the new window unknown before, by count then id.
        item = m_new.sparse_index("item_id")
        ids_new = read_vocab(new, m_new.sparse_features[item])
        counts = Counter(ids_new[r] for r in read_split_arrays(new, "train", m_new)["sparse"][:, item])
        known = set(read_vocab(old, m_old.sparse_features[item]))
        fresh = sorted((k for k in counts if k not in known), key=lambda k: (-counts[k], k))
        assert ids_new[len(known) :] == fresh and fresh


def test_metadata_chain(windows) -> None:
    _, _, (w1, w2, w3) = windows
    m1, m2, m3 = (read_metadata(w) for w in (w1, w2, w3))
    assert m1.window.previous is None and m1.lineage == []
    assert (m1.window.since, m1.window.until) == (1000.0, 1200.0)
    assert m2.window.previous.metadata_sha256 == metadata_sha256(w1)
    assert [e.path for e in m3.lineage] == [str(w1), str(w2)]  # oldest first
    assert [e.metadata_sha256 for e in m3.lineage] == [metadata_sha256(w1), metadata_sha256(w2)]
    assert (m3.lineage[1].since, m3.lineage[1].until) == (1200.0, 1400.0)
    assert m3.window.until is None


def test_earlier_folder_untouched(tmp_path: Path) -> None:
    write_source(tmp_path)
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    prepare(config(tmp_path, w1, "data.window.until=1300"), overwrite=False)
    before = checksums(w1)
    prepare(config(tmp_path, w2, "data.window.since=1300", f"data.window.previous={w1}"), overwrite=False)
    assert checksums(w1) == before
    with pytest.raises(UserError, match="data.window.previous: .* is data.prepared_dir itself"):
        prepare(config(tmp_path, w1, "data.window.since=1300", f"data.window.previous={w1}"), overwrite=True)
    assert checksums(w1) == before


def test_empty_window_is_a_clear_error(tmp_path: Path) -> None:
    write_source(tmp_path, rows=50)
    cfg = config(tmp_path, tmp_path / "out", "data.window.since=1998-03-01")
    with pytest.raises(UserError, match=r"data.window: no rows in \[1998-03-01T00:00:00\+00:00, end\)"):
        prepare(cfg, overwrite=False)


def test_source_without_timestamps(tmp_path: Path) -> None:
    (tmp_path / "t.csv").write_text("u,i\n1,2\n3,4\n")
    cfg = config(
        tmp_path,
        tmp_path / "out",
        "data.source={kind: table, path: " + str(tmp_path / "t.csv") + ", sparse: [u, i], user: u, item: i}",
        "model.two_tower.user_features=[u]",
        "model.two_tower.item_features=[i]",
        "data.window.until=2000",
    )
    with pytest.raises(UserError, match="data.window: the table source has no timestamp column"):
        prepare(cfg, overwrite=False)


def test_window_bounds_in_config(tmp_path: Path) -> None:
    iso = config(
        tmp_path, tmp_path / "o", "data.window.since=1998-03-01", "data.window.until='1998-03-02T00:00:00Z'"
    )
    assert iso.data.window.since == "1998-03-01"  # YAML's date kept as text, so the dump round-trips
    assert iso.data.window.bounds() == (888710400.0, 888796800.0)
    with pytest.raises(ConfigError, match="data.window.*since .* must be before until"):
        config(tmp_path, tmp_path / "o", "data.window.since=2000", "data.window.until=1000")
    with pytest.raises(ConfigError, match="data.window.until: 'yesterday' is neither"):
        config(tmp_path, tmp_path / "o", "data.window.until=yesterday")


def test_capped_table_grows_into_its_free_rows(tmp_path: Path) -> None:
    write_source(tmp_path)
    capped = "model.tables={item_id: {kind: capped, max_rows: 48, hashed_rows: 8}}"
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    prepare(config(tmp_path, w1, capped, "data.window.until=1200"), overwrite=False)
    prepare(
        config(tmp_path, w2, capped, "data.window.since=1200", f"data.window.previous={w1}"), overwrite=False
    )
    m1, m2 = read_metadata(w1), read_metadata(w2)
    f1, f2 = (m.sparse_features[m.sparse_index("item_id")] for m in (m1, m2))
    v1, v2 = read_vocab(w1, f1), read_vocab(w2, f2)
    assert f1.num_embeddings == f2.num_embeddings == 48 and len(v1) == len(v2) == 48
    owned1 = [v for v in v1[1:40] if v != "<UNUSED>"]
    assert "<UNUSED>" in v1 and v2[1 : 1 + len(owned1)] == owned1  # old ids keep their rows
    assert "<UNUSED>" not in v2  # new ids filled the free rows …
    assert v1[40:] == v2[40:] == [f"<HASHED {j}>" for j in range(8)]  # … the hashed block stays at the end
    assert m2.window.rows_inherited["item_id"] == len(owned1)
    assert m2.window.rows_added["item_id"] == 39 - len(owned1)
    other = "model.tables={item_id: {kind: capped, max_rows: 64, hashed_rows: 8}}"
    with pytest.raises(UserError, match="model.tables.item_id: capped .* a window keeps its predecessor's"):
        prepare(config(tmp_path, tmp_path / "w3", other, f"data.window.previous={w1}"), overwrite=False)


def test_cli_shortcuts(tmp_path: Path) -> None:
    from recsys.cli import main as cli

    write_source(tmp_path, rows=300)
    sets = [a for s in config_sets(tmp_path, tmp_path / "w1") for a in ("--set", s)]
    assert cli(["data", "prepare", "--config", "movielens_100k", *sets, "--until", "1998-03-01"]) == 0
    sets = [a for s in config_sets(tmp_path, tmp_path / "w2") for a in ("--set", s)]
    argv = ["--since", "1150", "--until", "1300", "--previous", str(tmp_path / "w1")]
    assert cli(["data", "prepare", "--config", "movielens_100k", *sets, *argv]) == 0
    w = read_metadata(tmp_path / "w2").window
    assert (w.since, w.until, w.rows_in_window) == (1150.0, 1300.0, 150)
    assert w.previous is not None and w.previous.path == str(tmp_path / "w1")
    assert read_metadata(tmp_path / "w1").window.until == 888710400.0  # 1998-03-01 UTC


# --------------------------------------------------------------------------- training on several windows
def _rows(sparse: np.ndarray) -> Counter:
    return Counter(map(tuple, sparse.tolist()))


def test_loader_reads_every_window_once(windows, tmp_path: Path) -> None:
    from recsys.data.loader import make_train_loader

    d, _, (w1, w2, w3) = windows
    cfg = config(d, w3, f"data.train_dirs=[{w2}, {w1}]")  # any listed order: read oldest first
    meta = read_metadata(w3)
    seen: Counter = Counter()
    for batch in make_train_loader(cfg, meta, 1):
        kjt = batch.sparse_features
        seen.update(_rows(kjt.values().view(len(kjt.keys()), -1).T.numpy()))
    want: Counter = Counter()
    for w in (w1, w2, w3):
        want.update(_rows(read_split_arrays(w, "train")["sparse"]))
    # Every train row of the three windows, in the newest vocabularies' row ids (stable across windows);
    # drop_last may leave out one short global batch at the end of the epoch.
    assert seen <= want and sum(want.values()) - sum(seen.values()) < 16


def test_train_dirs_must_be_ancestors(windows, tmp_path: Path) -> None:
    from recsys.data.lineage import train_folders

    d, _, (w1, w2, w3) = windows
    with pytest.raises(UserError, match=f"data.train_dirs: {w3} is not an ancestor of {w2}"):
        train_folders(config(d, w2, f"data.train_dirs=[{w3}]"), read_metadata(w2))
    alone = tmp_path / "alone"  # the same rows as w1, prepared without the chain: its rows may differ
    prepare(config(d, alone, "data.window.until=1200"), overwrite=False)
    with pytest.raises(UserError, match="is not an ancestor"):
        train_folders(config(d, w2, f"data.train_dirs=[{alone}]"), read_metadata(w2))
    folders = train_folders(config(d, w3, f"data.train_dirs=[{w3}, {w2}, {w1}]"), read_metadata(w3))
    assert [p for p, _ in folders] == [w1, w2, w3]


def test_trainer_trains_on_a_list_of_windows(windows, tmp_path: Path) -> None:
    from recsys.train import train

    d, _, (w1, w2, _) = windows
    sets = ["train.epochs=1", f"train.checkpoint.dir={tmp_path / 'ckpt'}", "tracking.enabled=false"]
    both = train(config(d, w2, f"data.train_dirs=[{w1}]", *sets))
    blocks = sum(read_metadata(w).splits["train"].blocks for w in (w1, w2))
    assert both.steps == blocks // 2  # 2 blocks a step: every window's blocks, not just the newest's
    assert np.isfinite(both.metrics["ndcg@10"]) and both.history


def test_managed_collision_id_list_grows(tmp_path: Path) -> None:
    """A managed-collision table holds id hashes (its rows are assigned while training): nothing to
    grow but the list of train ids its vocabulary file keeps for exports, which is extended in place."""
    rng = np.random.default_rng(0)
    n = 400
    ids = [f"c{rng.integers(0, 10 + k // 10)}" for k in range(n)]
    lines = ["label,d1,c1,ts", *(f"{k % 2},{k % 7},{ids[k]},{k}" for k in range(n))]
    (tmp_path / "ctr.csv").write_text("\n".join(lines) + "\n")
    sets = [
        "data.source={kind: table, path: " + str(tmp_path / "ctr.csv") + ", label: label, dense: [d1], "
        "sparse: [c1], timestamp: ts}",
        "model.tables={c1: {kind: managed_collision, max_rows: 16}}",
        "data.split={mode: random}",
    ]
    w1, w2 = tmp_path / "w1", tmp_path / "w2"
    prepare(load_config("dlrm_synth", [*sets, f"data.prepared_dir={w1}", "data.window.until=200"]), False)
    cfg = load_config(
        "dlrm_synth",
        [*sets, f"data.prepared_dir={w2}", "data.window.since=200", f"data.window.previous={w1}"],
    )
    prepare(cfg, overwrite=False)
    m1, m2 = read_metadata(w1), read_metadata(w2)
    f1, f2 = m1.sparse_features[0], m2.sparse_features[0]
    assert f1.table == f2.table == "managed_collision" and f1.num_embeddings == f2.num_embeddings == 16
    v1, v2 = read_vocab(w1, f1), read_vocab(w2, f2)
    assert v2[: len(v1)] == v1 and len(v2) > len(v1)
    assert (m2.window.rows_inherited["c1"], m2.window.rows_added["c1"]) == (len(v1) - 1, len(v2) - len(v1))

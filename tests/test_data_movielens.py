"""MovieLens in its original layouts and RecBole atomic files, with user/item side features.

Small hand-written files (formats, bad rows, missing side rows) and the real MovieLens-100K from the
recbole wheel on PyPI (the `ml100k_recbole` fixture; skipped when the registry cannot be reached).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow.compute as pc
import pytest

from recsys.config import RecBoleSource, config_from_dict, load_config
from recsys.data import readers as R
from recsys.data.loader import read_split_arrays
from recsys.data.metadata import read_metadata, read_vocab
from recsys.data.prepare import prepare
from recsys.errors import DataError, UserError

GENRES = ["genre_0", "genre_1", "genre_2"]


def col(t: R.Table, name: str) -> list[str | None]:
    return t.sparse[t.sparse_names.index(name)].to_pylist()


def flags(*on: str) -> str:
    return "|".join("1" if g in on else "0" for g in R.ML100K_GENRES)


# ----------------------------------------------------------------------------------------- ml-100k
def write_ml100k(d: Path, item_lines: list[str] | None = None) -> tuple[Path, Path, Path]:
    """u.data (items 1, 2 and 9 — 9 is not in u.item), u.user, u.item (latin-1, like the real one)."""
    (d / "u.data").write_text("1\t1\t5\t100\n2\t2\t3\t101\n1\t9\t4\t102\n")
    (d / "u.user").write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    toy_story = flags("Animation", "Children's", "Comedy", "Drama")
    items = item_lines or [
        f"1|Toy Story (1995)|01-Jan-1995||http://x|{toy_story}",
        f"2|Misérables, Les (1995)||||{flags('Drama')}",
    ]
    (d / "u.item").write_bytes(("\n".join(items) + "\n").encode("latin-1"))
    return d / "u.data", d / "u.user", d / "u.item"


def test_ml100k_side_features(tmp_path: Path) -> None:
    data, users, items = write_ml100k(tmp_path)
    t = R.read_movielens(data, False, users=users, items=items, genre_slots=3)
    assert t.sparse_names == ["user_id", "item_id", "age", "gender", "occupation", *GENRES, "year"]
    assert t.user_side == ["age", "gender", "occupation"] and t.item_side == [*GENRES, "year"]
    assert col(t, "age") == ["18", "50", "18"]  # 24 → ml-1m group 18-24, 53 → 50-55
    assert col(t, "occupation") == ["technician", "other", "technician"]
    # Genres in u.genre's flag order; the 4th (Drama) does not fit 3 slots; item 9 has no u.item row.
    assert [col(t, g) for g in GENRES] == [
        ["Animation", "Drama", None],
        ["Children's", None, None],
        ["Comedy", None, None],
    ]
    assert col(t, "year") == ["1995", None, None]  # empty release date → missing
    assert any("1 interactions (1 distinct item ids, e.g. ['9']) have no row in" in n for n in t.notes)
    assert any("1 items have more than 3 genres" in n for n in t.notes)
    assert [Path(s.path).name for s in t.sources] == ["u.data", "u.user", "u.item"]


def test_ml100k_path_only_keeps_the_old_layout(tmp_path: Path) -> None:
    data, _, _ = write_ml100k(tmp_path)
    t = R.read_movielens(data, False)
    assert t.sparse_names == ["user_id", "item_id"] and t.user_side == [] and t.notes == []


def test_ml100k_item_bad_rows_name_file_and_line(tmp_path: Path) -> None:
    good = f"1|A (1995)|01-Jan-1995|||{flags('Drama')}"
    cases = [
        (f"2|B (1995)|01-Jan-1995|||{flags('Drama').replace('1', '2')}", "genre flag 'Drama' must be 0 or 1"),
        (f"2|B (1995)|Jan 1995|||{flags('Drama')}", "release date 'Jan 1995' is not DD-Mon-YYYY"),
        (f"1|A again (1995)|01-Jan-1995|||{flags('Drama')}", "item id '1' repeats an earlier line"),
        ("2|B (1995)|01-Jan-1995", "expected 24 fields separated by '|', got 3"),
    ]
    for line, message in cases:
        _, _, items = write_ml100k(tmp_path, [good, line])
        with pytest.raises(DataError, match=rf"^{items}:2: {message}"):
            R.read_movielens_items(items, skip_bad_rows=False)
        side = R.read_movielens_items(items, skip_bad_rows=True)
        assert side.ids.to_pylist() == ["1"] and side.source.bad_rows.count == 1


def test_ml100k_user_bad_age(tmp_path: Path) -> None:
    (tmp_path / "u.user").write_text("1|24|M|technician|85711\n2|old|F|other|94043\n")
    with pytest.raises(DataError, match=r"u\.user:2: column 'age': 'old' is not a valid int64"):
        R.read_movielens_users(tmp_path / "u.user", skip_bad_rows=False)


# ------------------------------------------------------------------------------------------- ml-1m
def test_ml1m_dat_files(tmp_path: Path) -> None:
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n2::3::4::978302109\n")
    (tmp_path / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (tmp_path / "movies.dat").write_bytes(
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n3::Grumpier Old Men (1995)::Comedy|Romance\n"
        "4::Café: Wait (1995)::Comedy\n".encode("latin-1")
    )
    t = R.read_movielens(
        tmp_path / "ratings.dat", False, tmp_path / "users.dat", tmp_path / "movies.dat", genre_slots=2
    )
    assert col(t, "user_id") == ["1", "2"] and col(t, "item_id") == ["1193", "3"]
    assert t.label.tolist() == [5.0, 4.0] and t.timestamp.tolist() == [978300760, 978302109]
    assert col(t, "age") == ["1", "56"] and col(t, "gender") == ["F", "M"]  # groups kept as they are
    assert col(t, "occupation") == ["10", "16"]
    assert col(t, "genre_0") == ["Drama", "Comedy"] and col(t, "genre_1") == [None, "Romance"]
    assert col(t, "year") == ["1975", "1995"] and t.notes == []


def test_ml1m_bad_rows_name_the_real_separator(tmp_path: Path) -> None:
    p = tmp_path / "ratings.dat"
    p.write_text("1::1193::5::978300760\n1::661::3\n1::914::x::978301968\n")
    with pytest.raises(DataError, match=rf"^{p}:2: expected 4 fields separated by '::', got 3"):
        R.read_movielens(p, False)
    t = R.read_movielens(p, True)
    assert t.rows == 1 and t.sources[0].bad_rows.count == 2
    assert t.sources[0].bad_rows.examples[1].startswith(f"{p}:3: column 'rating': 'x'")


# -------------------------------------------------------------------------------- ml-latest / 25m
def test_ml_latest_csv(tmp_path: Path) -> None:
    (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,5,3.5,1\n")
    (tmp_path / "movies.csv").write_text(
        "movieId,title,genres\n"
        '1,"American President, The (1995)",Comedy|Drama|Romance\n'
        "5,Babylon 5,(no genres listed)\n"
    )
    t = R.read_movielens(tmp_path / "ratings.csv", False, items=tmp_path / "movies.csv", genre_slots=3)
    assert t.item_side == [*GENRES, "year"] and t.user_side == []
    assert [col(t, g)[0] for g in GENRES] == ["Comedy", "Drama", "Romance"]
    assert col(t, "genre_0")[1] == "(no genres listed)" and col(t, "year") == ["1995", None]


def test_unknown_item_file(tmp_path: Path) -> None:
    (tmp_path / "items.txt").write_text("hello world\n")
    with pytest.raises(DataError, match=r"items\.txt:1: not a MovieLens item file"):
        R.read_movielens_items(tmp_path / "items.txt", False)


# ------------------------------------------------------------------------------------------ recbole
def write_recbole(d: Path) -> RecBoleSource:
    """Atomic files: .inter (item c has no .item row), .user with a float, .item with a token_seq."""
    (d / "x.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\tnote:token_seq\n"
        "u1\ta\t3\t10\thi there\nu2\tb\t4\t11\t\nu1\tc\t5\t12\tx\n"
    )
    (d / "x.user").write_text(
        "user_id:token\tage:float\tgender:token\n" + "".join(f"u{i}\t{20 + i}\tF\n" for i in range(1, 9))
    )
    (d / "x.item").write_text(
        "item_id:token\ttitle:token_seq\tclass:token_seq\tvec:float_seq\n"
        "a\tToy Story\tAnimation Children's Comedy\t0.1 0.2\nb\tHeat\t\t0.3\n"
    )
    return RecBoleSource(
        kind="recbole",
        inter=str(d / "x.inter"),
        user=str(d / "x.user"),
        item=str(d / "x.item"),
        item_features=["class"],
        rename={"class": "genre"},
        seq_slots=2,
        float_buckets=4,
    )


def test_recbole_joins_side_features(tmp_path: Path) -> None:
    t = R.read_recbole(write_recbole(tmp_path), skip_bad_rows=False)
    assert t.sparse_names == ["user_id", "item_id", "age", "gender", "genre_0", "genre_1"]
    assert t.user_side == ["age", "gender"] and t.item_side == ["genre_0", "genre_1"]
    assert t.label.tolist() == [3.0, 4.0, 5.0] and t.timestamp.tolist() == [10.0, 11.0, 12.0]
    # ages 21..28 in 4 quantile buckets over the 8 users: u1 = 21 and u2 = 22 fall in the first
    assert col(t, "age") == ["<22.75", "<22.75", "<22.75"]
    assert col(t, "genre_0") == ["Animation", None, None] and col(t, "genre_1") == ["Children's", None, None]
    assert any("1 interactions (1 distinct item ids, e.g. ['c'])" in n for n in t.notes)
    assert any("1 items have more than 2 'class' tokens" in n for n in t.notes)


def test_quantile_tokens() -> None:
    import pyarrow as pa

    v = pa.array([1.0, 2.0, 3.0, 4.0, None])
    assert R.quantile_tokens(v, 2).to_pylist() == ["<2.5", "<2.5", ">=2.5", ">=2.5", None]
    assert R.quantile_tokens(pa.array([7.0, 7.0]), 3).to_pylist() == ["7", "7"]


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (
            {"rating_field": "stars"},
            DataError,
            r"x\.inter:1: no field 'stars' \(data\.source\.rating_field\)",
        ),
        ({"item_features": ["vec"]}, UserError, r"'vec' is float_seq"),
        ({"item_features": ["nope"]}, UserError, r"item_features: 'nope' is not a feature field"),
        ({"rename": {"nope": "x"}}, UserError, r"data\.source\.rename: 'nope' is not a field"),
    ],
)
def test_recbole_config_errors(tmp_path: Path, change: dict, error: type, message: str) -> None:
    src = write_recbole(tmp_path).model_copy(update=change)
    with pytest.raises(error, match=message):
        R.read_recbole(src, skip_bad_rows=False)


def test_recbole_feature_name_clash(tmp_path: Path) -> None:
    src = write_recbole(tmp_path).model_copy(update={"item_features": ["gender"]})
    (tmp_path / "x.item").write_text("item_id:token\tgender:token\na\tF\n")
    with pytest.raises(UserError, match=r"x\.item: feature 'gender' is already a feature of .*x\.inter"):
        R.read_recbole(src, skip_bad_rows=False)


def test_recbole_bad_files(tmp_path: Path) -> None:
    src = write_recbole(tmp_path)
    inter = tmp_path / "x.inter"
    inter.write_text("user_id\titem_id:token\nu1\ta\n")
    with pytest.raises(DataError, match=rf"^{inter}:1: header field 'user_id' is not name:type"):
        R.read_recbole(src, False)
    inter.write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ta\t3\t10\nu2\tb\tfour\t11\n"
    )
    with pytest.raises(DataError, match=rf"^{inter}:3: column 'rating:float': 'four' is not a valid double"):
        R.read_recbole(src, False)
    user = tmp_path / "x.user"
    user.write_text("user_id:token\tage:float\tgender:token\nu1\t20\tF\nu2\t30\tM\nu1\t40\tM\n")
    inter.write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\nu1\ta\t3\t10\n")
    with pytest.raises(DataError, match=rf"^{user}:4: user id 'u1' repeats an earlier line"):
        R.read_recbole(src, False)
    t = R.read_recbole(src, True)  # skipped: the first line of u1 wins
    assert col(t, "gender") == ["F"] and t.sources[1].bad_rows.count == 1


def test_prepare_records_side_features(tmp_path: Path) -> None:
    data, users, items = write_ml100k(tmp_path)
    cfg = config_from_dict(
        {
            "name": "ml-side",
            "data": {
                "source": {"kind": "movielens", "path": str(data), "users": str(users), "items": str(items)},
                "prepared_dir": str(tmp_path / "prepared"),
                "label": {"mode": "all_positive"},
                "block_size": 1,
            },
            "model": {"kind": "two_tower"},
            "train": {"batch_size": 1},
            "eval": {"batch_size": 1},
        }
    )
    meta = prepare(cfg, overwrite=False)
    assert meta.user_side_features == ["age", "gender", "occupation"]
    assert meta.item_side_features == [*GENRES, "year"]
    assert any("have no row in" in n for n in meta.read_notes)
    assert read_metadata(cfg.data.prepared_dir).read_notes == meta.read_notes


# --------------------------------------------------------------------------- real MovieLens-100K
def test_real_ml100k_inter(ml100k_recbole: Path) -> None:
    src = RecBoleSource(kind="recbole", inter=str(ml100k_recbole / "ml-100k.inter"))
    t = R.read_recbole(src, skip_bad_rows=False)
    assert t.rows == 100_000
    assert pc.count_distinct(t.sparse[0]).as_py() == 943 and pc.count_distinct(t.sparse[1]).as_py() == 1682
    # u.data's first line: 196	242	3	881250949
    assert (col(t, "user_id")[0], col(t, "item_id")[0]) == ("196", "242")
    assert (t.label[0], t.timestamp[0]) == (3.0, 881250949.0)


def train_items_leave_last_2(inter: Path) -> int:
    """Distinct items left in train when each user's last two ratings (by time, then file order) go
    to test and val — computed with pandas, apart from recsys' split code."""
    import pandas as pd

    df = pd.read_csv(inter, sep="\t", dtype=str).rename(columns=lambda c: c.split(":")[0])
    df["t"], df["pos"] = df["timestamp"].astype(float), range(len(df))
    df = df.sort_values(["user_id", "t", "pos"])
    from_end = df.groupby("user_id").cumcount(ascending=False)
    return df.loc[from_end >= 2, "item_id"].nunique()


def test_real_ml100k_prepare_with_side_features(ml100k_recbole: Path, tmp_path: Path) -> None:
    d = ml100k_recbole
    cfg = load_config(
        "movielens_100k_recbole",
        [
            f"data.source.inter={d / 'ml-100k.inter'}",
            f"data.source.user={d / 'ml-100k.user'}",
            f"data.source.item={d / 'ml-100k.item'}",
            f"data.prepared_dir={tmp_path / 'prepared'}",
            "data.split.mode=leave_last_n",  # the shipped config splits at random; this checks the temporal split
        ],
    )
    meta = prepare(cfg, overwrite=False)
    names = [f.name for f in meta.sparse_features]
    tt = cfg.model.two_tower
    assert names == ["user_id", "item_id", "age", "gender", "occupation", *GENRES, "year"]
    assert meta.user_side_features == tt.user_features[1:] and meta.item_side_features == tt.item_features[1:]
    assert meta.splits["test"].rows == 943 and meta.splits["val"].rows == 943  # leave-last-1 per user
    assert sum(s.rows for s in meta.splits.values()) == 100_000 == meta.splits["train"].positives + 2 * 943
    sizes = {f.name: f.num_embeddings for f in meta.sparse_features}
    # Vocabularies are fit on train; every user keeps train rows, as do the 2 genders, 21 occupations,
    # 19 genres as first genre (18 + "unknown") and 61 ages.
    assert (sizes["user_id"], sizes["gender"], sizes["occupation"], sizes["age"]) == (944, 3, 22, 62)
    assert sizes["genre_0"] == 20 and sizes["item_id"] == train_items_leave_last_2(d / "ml-100k.inter") + 1
    assert any("have more than 3 'class' tokens" in n for n in meta.read_notes)

    # Toy Story (item 1) carries its genres and year in every row.
    train = read_split_arrays(cfg.data.prepared_dir, "train")
    vocab = {f.name: read_vocab(cfg.data.prepared_dir, f) for f in meta.sparse_features}
    toy = train["sparse"][train["sparse"][:, 1] == vocab["item_id"].index("1"), 5:]
    assert len(toy) > 100 and (toy == toy[0]).all()
    assert [vocab[n][r] for n, r in zip(names[5:], toy[0], strict=True)] == [
        "Animation", "Children's", "Comedy", "1995"
    ]  # fmt: skip


def test_movielens_100k_config_reads_what_the_recbole_one_does(ml100k_recbole: Path, tmp_path: Path) -> None:
    """The shipped movielens_100k (u.data/u.user/u.item, written from RecBole's files) and
    movielens_100k_recbole configs: the bench's split exactly, and the same genres, year, gender and
    occupation per id (age: u.user's years become ml-1m's groups there, RecBole keeps the years)."""
    from recsys.bench.quality import prepare_and_check, random_split_of

    split = random_split_of(ml100k_recbole / "ml-100k.inter")
    side: dict[str, dict[str, dict[str, tuple[str, ...]]]] = {}
    for config in ("movielens_100k", "movielens_100k_recbole"):
        work = tmp_path / config
        prepare_and_check(ml100k_recbole, work, split, config)  # raises unless val/test are the bench's
        meta = read_metadata(work / "prepared")
        # each rating decides its split alone: ~80 % of 100,000, binomial (4 sigma ≈ 506)
        assert meta.splits["train"].rows == len(split.train) and abs(len(split.train) - 80_000) < 506
        vocab = {f.name: read_vocab(work / "prepared", f) for f in meta.sparse_features}
        names = [f.name for f in meta.sparse_features]
        rows = read_split_arrays(work / "prepared", "train", meta)["sparse"]
        side[config] = {}
        for key, feats in (("item_id", [*GENRES, "year"]), ("user_id", ["gender", "occupation"])):
            cols = [names.index(key), *(names.index(f) for f in feats)]
            side[config][key] = {
                vocab[key][r[0]]: tuple(vocab[f][v] for f, v in zip(feats, r[1:], strict=True))
                for r in rows[:, cols]
            }
    ours, recbole = side["movielens_100k"], side["movielens_100k_recbole"]
    # RecBole's year column holds junk for 2 items ("unkonwn", "V"): u.item gets no date, so no year.
    junk = {k: v for k, v in recbole["item_id"].items() if not v[-1].isdigit() and v[-1] != "<OOV>"}
    assert {k: v[-1] for k, v in junk.items()} == {"267": "unkonwn", "1412": "V"}
    recbole["item_id"].update({k: (*v[:-1], "<OOV>") for k, v in junk.items()})
    assert ours == recbole
    assert ours["item_id"]["1"] == ("Animation", "Children's", "Comedy", "1995")


def test_presplit_parts_share_the_side_files(tmp_path: Path) -> None:
    data, users, items = write_ml100k(tmp_path)
    (tmp_path / "u1.test").write_text("2\t1\t4\t200\n")
    part = {"kind": "movielens", "users": str(users), "items": str(items)}
    cfg = config_from_dict(
        {
            "name": "ml-presplit",
            "data": {
                "source": {
                    "kind": "presplit",
                    "train": {**part, "path": str(data)},
                    "val": {**part, "path": str(data)},
                    "test": {**part, "path": str(tmp_path / "u1.test")},
                },
                "prepared_dir": str(tmp_path / "prepared"),
                "split": {"mode": "presplit"},
                "label": {"mode": "all_positive"},
                "block_size": 1,
            },
            "model": {"kind": "two_tower"},
            "train": {"batch_size": 1},
            "eval": {"batch_size": 1},
        }
    )
    meta = prepare(cfg, overwrite=False)
    assert meta.item_side_features == [*GENRES, "year"] and meta.splits["test"].rows == 1
    assert len(meta.read_notes) == len(set(meta.read_notes)) == 2  # each file's notes once


def test_prepare_and_check_refuses_a_split_that_differs_either_way(
    ml100k_recbole: Path, tmp_path: Path
) -> None:
    """The bench's val holding one pair more than the product's (moved from train), or one pair less,
    is refused: the check compares the splits for equality, not one way."""
    import dataclasses

    import numpy as np

    from recsys.bench.quality import prepare_and_check, random_split_of

    split = random_split_of(ml100k_recbole / "ml-100k.inter")
    more = dataclasses.replace(split, train=split.train[1:], val=np.concatenate([split.val, split.train[:1]]))
    with pytest.raises(RuntimeError, match="val split differs"):
        prepare_and_check(ml100k_recbole, tmp_path / "more", more)
    fewer = dataclasses.replace(split, train=np.concatenate([split.train, split.val[:1]]), val=split.val[1:])
    with pytest.raises(RuntimeError, match="val split differs"):
        prepare_and_check(ml100k_recbole, tmp_path / "fewer", fewer)

"""Readers of every source kind, on small files written here: formats, empty fields, bad rows, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.data import readers as R
from recsys.errors import DataError, UserError


def ids(col: pa.ChunkedArray) -> list[str | None]:
    return col.to_pylist()


def test_movielens_u_data(tmp_path: Path) -> None:
    p = tmp_path / "u.data"
    p.write_text("196\t242\t3\t881250949\n0\t302\t3\t891717742\n22\t377\t1\t878887116\n")
    t = R.read_movielens(p, skip_bad_rows=False)
    assert t.kind == "interactions" and t.sparse_names == ["user_id", "item_id"]
    assert ids(t.sparse[0]) == ["196", "0", "22"]  # id "0" is an id, not a missing value
    assert ids(t.sparse[1]) == ["242", "302", "377"]
    assert t.label.tolist() == [3.0, 3.0, 1.0]
    assert t.timestamp.tolist() == [881250949, 891717742, 878887116]
    assert t.sources[0].rows == 3 and len(t.sources[0].sha256) == 64


def test_movielens_ratings_csv(tmp_path: Path) -> None:
    p = tmp_path / "ratings.csv"
    p.write_text("userId,movieId,rating,timestamp\n1,1,4.0,964982703\n1,3,4.5,964981247\n2,007,0.5,1\n")
    t = R.read_movielens(p, skip_bad_rows=False)
    assert ids(t.sparse[1]) == ["1", "3", "007"]  # ids keep their exact text
    assert t.label.tolist() == [4.0, 4.5, 0.5]


def test_learning_from_sets_hashed_user_ids(tmp_path: Path) -> None:
    p = tmp_path / "item_ratings.csv"
    p.write_text(
        "userId,movieId,rating,tstamp\n"
        "8e7cebf4a2b5d1e3e0d7c3a1,1,4.5,2017-05-01 10:00:00\n"
        "00af23bc9e1f,296,2.0,2017-05-02 11:30:00\n"
        "8e7cebf4a2b5d1e3e0d7c3a1,318,5.0,2017-05-03 08:00:00\n"
    )
    t = R.read_learning_from_sets(p, skip_bad_rows=False)
    assert ids(t.sparse[0]) == ["8e7cebf4a2b5d1e3e0d7c3a1", "00af23bc9e1f", "8e7cebf4a2b5d1e3e0d7c3a1"]
    assert t.timestamp[1] - t.timestamp[0] == 86400 + 5400


def test_criteo_empty_fields_and_negative_ints(tmp_path: Path) -> None:
    p = tmp_path / "day_0"
    # label, 13 ints (some empty, one negative), 26 categoricals (some empty)
    row1 = ["1", "5", "-1", "", *["0"] * 10, "68fd1e64", "", *[f"{i:08x}" for i in range(24)]]
    row2 = ["0", "", "2", "3", *["1"] * 10, "", "80e26c9b", *["0"] * 24]
    p.write_text("\t".join(row1) + "\n" + "\t".join(row2) + "\n")
    t = R.read_criteo([p], skip_bad_rows=False)
    assert t.rows == 2 and t.dense.shape == (2, 13) and len(t.sparse) == 26
    assert t.label.tolist() == [1.0, 0.0]
    np.testing.assert_allclose(t.dense[0, :3], [np.log1p(5), 0.0, 0.0], rtol=1e-6)  # -1 → 0, empty → 0
    np.testing.assert_allclose(t.dense[1, :3], [0.0, np.log1p(2), np.log1p(3)], rtol=1e-6)
    assert ids(t.sparse[0]) == ["68fd1e64", None] and ids(t.sparse[1]) == [None, "80e26c9b"]
    assert ids(t.sparse[2]) == ["00000000", "0"]
    assert t.day.tolist() == [0, 0]


def criteo_line(label: str = "1") -> str:
    return "\t".join([label, *["1"] * 13, *["a1b2c3d4"] * 26])


def test_criteo_bad_row_stops_with_file_and_line(tmp_path: Path) -> None:
    p = tmp_path / "day_0"
    p.write_text(criteo_line() + "\n" + criteo_line() + "\tEXTRA\n" + criteo_line("0") + "\n")
    with pytest.raises(DataError, match=rf"^{p}:2: expected 40 fields"):
        R.read_criteo([p], skip_bad_rows=False)


def test_criteo_bad_label_and_skip_mode(tmp_path: Path) -> None:
    p = tmp_path / "day_0"
    lines = [criteo_line(), criteo_line("7"), criteo_line("0"), criteo_line().replace("\t1\t", "\tx\t", 1)]
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=rf"{p}:2: label must be 0 or 1"):
        R.read_criteo([p], skip_bad_rows=False)
    t = R.read_criteo([p], skip_bad_rows=True)
    assert t.rows == 2 and t.label.tolist() == [1.0, 0.0]
    bad = t.sources[0].bad_rows
    assert bad.count == 2
    assert bad.examples[0].startswith(f"{p}:2: label") and bad.examples[1].startswith(
        f"{p}:4: column 'int_0'"
    )


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nope\.tsv: file not found"):
        R.read_criteo([tmp_path / "nope.tsv"], skip_bad_rows=False)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        R.read_movielens(tmp_path / "empty.csv", skip_bad_rows=False)
    (tmp_path / "header.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(DataError, match=r"header\.csv: no data rows"):
        R.read_movielens(tmp_path / "header.csv", skip_bad_rows=False)


def table_kwargs(**kw: object) -> dict:
    base = dict(label="clicked", dense=["price"], sparse=["cat"], timestamp=None, user="u", item="i")
    return {**base, **kw, "skip_bad_rows": kw.get("skip_bad_rows", False)}


def test_generic_csv_and_parquet(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text('u,i,clicked,price,cat,unused\n0,10,1,3.0,"a,b",x\n1,11,0,,,y\n')
    t = R.read_table(csv, **table_kwargs())
    assert t.sparse_names == ["u", "i", "cat"] and t.user_feature == "u" and t.item_feature == "i"
    assert ids(t.sparse[0]) == ["0", "1"] and ids(t.sparse[2]) == ["a,b", None]
    np.testing.assert_allclose(t.dense[:, 0], [np.log1p(3.0), 0.0], rtol=1e-6)

    pqf = tmp_path / "t.parquet"
    pq.write_table(
        pa.table({"u": [5, 6], "i": ["x", "y"], "clicked": [1, 0], "price": [1.0, None], "cat": ["c", None]}),
        pqf,
    )
    t = R.read_table(pqf, **table_kwargs())
    assert ids(t.sparse[0]) == ["5", "6"] and t.label.tolist() == [1.0, 0.0]


def test_generic_wrong_mapping_names_column_and_present_columns(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("u,i,clicked\n1,2,1\n")
    with pytest.raises(
        UserError, match=r"column 'price' .*not found; columns present: \['u', 'i', 'clicked'\]"
    ):
        R.read_table(csv, **table_kwargs())


def test_generic_csv_bad_rows(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("u,i,clicked\n1,2,1\n1,2,maybe\n3,4\n5,6,0\n")
    kw = table_kwargs(dense=[], sparse=[])
    with pytest.raises(DataError, match=rf"{csv}:3: column 'clicked'"):
        R.read_table(csv, **kw)
    t = R.read_table(csv, **{**kw, "skip_bad_rows": True})
    assert t.rows == 2 and t.sources[0].bad_rows.count == 2
    assert t.sources[0].bad_rows.examples[1].startswith(f"{csv}:4: expected 3 fields")


def test_parquet_null_label_is_a_bad_row(tmp_path: Path) -> None:
    pqf = tmp_path / "t.parquet"
    pq.write_table(pa.table({"u": [1, 2], "i": [3, 4], "clicked": [1, None]}), pqf)
    kw = table_kwargs(dense=[], sparse=[])
    with pytest.raises(DataError, match=r"t\.parquet:row 2: column 'clicked' is empty"):
        R.read_table(pqf, **kw)
    assert R.read_table(pqf, **{**kw, "skip_bad_rows": True}).rows == 1


def test_delimited_bytes_after_a_transform_keep_file_lines(tmp_path: Path) -> None:
    p = tmp_path / "movies.dat"
    p.write_bytes("1::Café (1995)::Comedy\n2::Bad\n".encode("latin-1"))
    data = p.read_bytes().replace(b"::", b"\x1f")
    kw = dict(
        delimiter="\x1f",
        columns=["id", "title", "genres"],
        types=dict.fromkeys(["id", "title", "genres"], R.STR),
    )
    kw |= dict(
        header=False, required=["id"], quoting=False, encoding="latin-1", data=data, separator_name="'::'"
    )
    with pytest.raises(DataError, match=rf"^{p}:2: expected 3 fields separated by '::', got 2"):
        R.read_delimited(p, skip_bad_rows=False, **kw)
    tbl, bad = R.read_delimited(p, skip_bad_rows=True, **kw)
    assert tbl.column("title").to_pylist() == ["Café (1995)"] and bad.count == 1


def test_read_source_movielens_side_files_and_recbole(tmp_path: Path) -> None:
    from pydantic import TypeAdapter

    from recsys.config import Source

    (tmp_path / "u.data").write_text("1\t7\t4\t100\n")
    (tmp_path / "u.item").write_text(
        "7|Heat (1995)|15-Dec-1995|||" + "|".join(["0"] * 8 + ["1"] + ["0"] * 10) + "\n"
    )
    src = TypeAdapter(Source).validate_python(
        {
            "kind": "movielens",
            "path": str(tmp_path / "u.data"),
            "items": str(tmp_path / "u.item"),
            "genre_slots": 1,
        }
    )
    t = R.read_source(src, skip_bad_rows=False)
    assert t.sparse_names == ["user_id", "item_id", "genre_0", "year"]
    assert ids(t.sparse[2]) == ["Drama"] and ids(t.sparse[3]) == ["1995"]

    (tmp_path / "r.inter").write_text("user_id:token\titem_id:token\n1\t7\n")
    src = TypeAdapter(Source).validate_python(
        {"kind": "recbole", "inter": str(tmp_path / "r.inter"), "rating_field": None, "time_field": None}
    )
    t = R.read_source(src, skip_bad_rows=False)
    assert t.label is None and t.timestamp is None and ids(t.sparse[1]) == ["7"]


def _u_data_with_a_bad_byte(tmp_path: Path) -> Path:
    p = tmp_path / "u.data"
    p.write_bytes(b"196\t242\t3\t881250949\n0\t302\t3\t891717742\n22\t37\xe97\t1\t878887116\n1\t2\t3\t4\n")
    return p


def test_non_utf8_bytes_are_a_bad_row_naming_file_line_and_byte(tmp_path: Path) -> None:
    """A u.data with one byte that is not UTF-8: one DataError naming file:line and the byte, and what
    to do; with skip_bad_rows that line is skipped and counted, the others kept."""
    p = _u_data_with_a_bad_byte(tmp_path)
    with pytest.raises(DataError, match=rf"^{p}:3: .*0xe9.* not valid utf-8.*re-encode.*skip-bad-rows"):
        R.read_movielens(p, skip_bad_rows=False)
    t = R.read_movielens(p, skip_bad_rows=True)
    assert ids(t.sparse[0]) == ["196", "0", "1"] and t.sources[0].bad_rows.count == 1


def test_recsys_data_prepare_on_a_non_utf8_u_data_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`recsys data prepare` on that file: exit status 2 and one line, no traceback."""
    from recsys.cli import main

    p = _u_data_with_a_bad_byte(tmp_path)
    argv = ["data", "prepare", "--config", "movielens_100k", "--set", f"data.source.path={p}"]
    argv += ["--set", "data.source.users=null", "--set", "data.source.items=null"]
    argv += [
        "--set",
        "model.two_tower.user_features=[user_id]",
        "--set",
        "model.two_tower.item_features=[item_id]",
    ]
    argv += ["--set", f"data.prepared_dir={tmp_path / 'prepared'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("recsys:")]  # not the progress line
    assert len(errors) == 1 and errors[0].startswith(f"recsys: {p}:3: byte 0xe9") and "Traceback" not in err

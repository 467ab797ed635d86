"""MovieLens in its original layouts (ml-100k, ml-1m/10m `.dat`, ml-latest/25m `.csv`) with side features."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys.data.metadata import BadRows
from recsys.data.readers.delimited import FLOAT, INT, STR, read_delimited
from recsys.data.readers.files import _first_line, check_file
from recsys.data.readers.side import (
    SideTable,
    _no_repeats,
    _side,
    _unique_ids,
    join_side,
    split_tokens,
    token_slots,
)
from recsys.data.readers.table import Table, _interactions, _strings
from recsys.errors import DataError

# ml-1m's users.dat holds age groups (1 = under 18, 18 = 18-24, 25, 35, 45, 50, 56 = 56+); ml-100k's
# ages in years are mapped to the same codes so both give one small, shared age vocabulary.
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])
_AGE_GROUPS = np.array(["1", "18", "25", "35", "45", "50", "56"], dtype=object)
# u.item's 19 genre flags, in file order (ml-100k u.genre).
ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
    "War", "Western",
]  # fmt: skip
_DAT_SEP = "\x1f"  # what `::` becomes before parsing (pyarrow splits on one character)
_TITLE_YEAR = r"\((?P<year>\d{4})(?:[-–]\d{4})?\)\s*$"  # "Toy Story (1995)", "Show (2006–2007)"
_DATE_YEAR = r"^\d{1,2}-[A-Za-z]{3}-(?P<year>\d{4})$"  # u.item release date "01-Jan-1995"


def _dat(p: Path) -> dict[str, Any]:
    """read_delimited options of a `::`-separated .dat file (ml-1m, ml-10m; ml-1m is latin-1)."""
    data = p.read_bytes().replace(b"::", _DAT_SEP.encode())
    return {"delimiter": _DAT_SEP, "data": data, "encoding": "latin-1", "separator_name": "'::'"}


def _year(values: pa.ChunkedArray, pattern: str) -> pa.Array:
    """The 4-digit year captured by `pattern` (null where it does not match)."""
    arr = _strings(values).combine_chunks()
    return pc.struct_field(pc.extract_regex(arr, pattern=pattern), [0])


def genre_names(slots: int) -> list[str]:
    """Names of the genre features: genre_0 … genre_{slots-1}."""
    return [f"genre_{j}" for j in range(slots)]


def _read_ratings(p: Path, skip_bad_rows: bool) -> Table:
    """u.data / u1.base (tab), ratings.dat (`::`) or ratings.csv (header userId,movieId,…)."""
    cols = ["user", "item", "rating", "timestamp"]
    types = {"user": STR, "item": STR, "rating": FLOAT, "timestamp": INT}
    first = _first_line(p)
    head = next(csv.reader([first]), [])
    if head[:2] == ["userId", "movieId"]:
        csv_cols = ["userId", "movieId", "rating", "timestamp"]
        missing = [c for c in csv_cols if c not in head]
        if missing:
            raise DataError(f"{p}: ratings.csv header lacks {missing} (columns present: {head})")
        tbl, bad = read_delimited(
            p,
            delimiter=",",
            columns=csv_cols,
            types=dict(zip(csv_cols, types.values(), strict=True)),
            header=True,
            required=csv_cols,
            quoting=True,
            skip_bad_rows=skip_bad_rows,
        )
        return _interactions(p, tbl, bad, "userId", "movieId", "rating", "timestamp")
    opts: dict[str, Any] = _dat(p) if "::" in first else {"delimiter": "\t"}
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types=types,
        header=False,
        required=cols,
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        **opts,
    )
    return _interactions(p, tbl, bad, "user", "item", "rating", "timestamp")


def read_movielens_users(path: str | Path, skip_bad_rows: bool) -> SideTable:
    """u.user (`id|age|gender|occupation|zip`, ages in years → age groups) or users.dat
    (`id::gender::age::occupation::zip`, ages already groups): features age, gender, occupation."""
    p = check_file(path)
    dat = "::" in _first_line(p)
    if dat:
        cols, opts = ["user_id", "gender", "age", "occupation", "zip"], _dat(p)
    else:
        cols, opts = (
            ["user_id", "age", "gender", "occupation", "zip"],
            {"delimiter": "|", "encoding": "latin-1"},
        )
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types={c: INT if c == "age" and not dat else STR for c in cols},
        header=False,
        required=["user_id"],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats("user_id", "user"),
        table_check=_unique_ids("user_id"),
        **opts,
    )
    age = tbl.column("age")
    if not dat:
        group = np.searchsorted(_AGE_EDGES, pc.fill_null(age, 0).to_numpy(), side="right")
        age = pa.array(
            _AGE_GROUPS[group], type=pa.string(), mask=age.is_null().to_numpy(zero_copy_only=False)
        )
    features = {
        "age": _strings(age).combine_chunks(),
        "gender": _strings(tbl.column("gender")).combine_chunks(),
        "occupation": _strings(tbl.column("occupation")).combine_chunks(),
    }
    return _side("user", p, tbl, bad, "user_id", features, [])


def read_movielens_items(path: str | Path, skip_bad_rows: bool, genre_slots: int = 3) -> SideTable:
    """u.item, movies.dat or movies.csv (detected from the first line): features genre_0 … and year.

    Genres keep the file's order (u.item: flag order of u.genre; the others: `A|B` order); the year is
    u.item's release date year, or the "(1995)" at the end of the title in the others."""
    p = check_file(path)
    first = _first_line(p)
    if "::" in first or first.startswith("movieId"):
        tbl, bad, flat, parents, year = _read_movies(p, skip_bad_rows, dat="::" in first)
    elif "|" in first:
        tbl, bad, flat, parents, year = _read_u_item(p, skip_bad_rows)
    else:
        raise DataError(f"{p}:1: not a MovieLens item file (u.item, movies.dat or movies.csv)")
    features, over = token_slots(flat, parents, tbl.num_rows, genre_names(genre_slots))
    notes = []
    if over:
        notes.append(
            f"{p}: {over:,} items have more than {genre_slots} genres; genres after the first "
            f"{genre_slots} (in file order) are dropped (data.source.genre_slots)"
        )
    return _side("item", p, tbl, bad, "item_id", {**features, "year": year}, notes)


def _read_movies(
    p: Path, skip_bad_rows: bool, dat: bool
) -> tuple[pa.Table, BadRows, pa.Array, np.ndarray, pa.Array]:
    """movies.dat (`id::title::A|B`) or movies.csv (`movieId,title,genres`, quoted)."""
    cols = ["item_id", "title", "genres"] if dat else ["movieId", "title", "genres"]
    opts: dict[str, Any] = _dat(p) if dat else {"delimiter": ","}
    tbl, bad = read_delimited(
        p,
        columns=cols,
        types=dict.fromkeys(cols, STR),
        header=not dat,
        required=cols[:1],
        quoting=not dat,
        skip_bad_rows=skip_bad_rows,
        row_check=_no_repeats(cols[0], "item"),
        table_check=_unique_ids(cols[0]),
        **opts,
    )
    tbl = tbl.rename_columns(["item_id", "title", "genres"])
    flat, parents = split_tokens(tbl.column("genres"), "|")
    return tbl, bad, flat, parents, _year(tbl.column("title"), _TITLE_YEAR)


def _read_u_item(p: Path, skip_bad_rows: bool) -> tuple[pa.Table, BadRows, pa.Array, np.ndarray, pa.Array]:
    """ml-100k u.item: id|title|release date|video release date|IMDb URL|19 genre flags (latin-1)."""
    flags = [f"is_{g}" for g in ML100K_GENRES]
    cols = ["item_id", "title", "release_date", "video_release_date", "url", *flags]
    repeats = _no_repeats("item_id", "item")

    def row_check(row: dict[str, Any]) -> str | None:
        bad_flag = next((f for f in flags if row[f] not in (0, 1)), None)
        if bad_flag is not None:
            return f"genre flag {bad_flag.removeprefix('is_')!r} must be 0 or 1, got {row[bad_flag]}"
        date = row["release_date"]
        if date is not None and re.search(_DATE_YEAR, date) is None:
            return f"release date {date!r} is not DD-Mon-YYYY"
        return repeats(row)

    def table_check(tbl: pa.Table) -> bool:
        flags_ok = all(pc.all(pc.is_in(tbl.column(f), pa.array([0, 1]))).as_py() for f in flags)
        dates = tbl.column("release_date")
        return (
            flags_ok
            and _year(dates, _DATE_YEAR).null_count == dates.null_count
            and _unique_ids("item_id")(tbl)
        )

    tbl, bad = read_delimited(
        p,
        delimiter="|",
        columns=cols,
        types={c: INT if c in flags else STR for c in cols},
        header=False,
        required=["item_id", *flags],
        quoting=False,
        skip_bad_rows=skip_bad_rows,
        row_check=row_check,
        table_check=table_check,
        encoding="latin-1",
    )
    matrix = np.stack([tbl.column(f).to_numpy() for f in flags], axis=1)
    rows, genre = np.nonzero(matrix)  # row-major: each item's genres in flag order
    flat = pa.array(np.array(ML100K_GENRES, dtype=object)[genre], type=pa.string())
    return tbl, bad, flat, rows, _year(tbl.column("release_date"), _DATE_YEAR)


def read_movielens(
    path: str | Path,
    skip_bad_rows: bool,
    users: str | Path | None = None,
    items: str | Path | None = None,
    genre_slots: int = 3,
) -> Table:
    """MovieLens ratings in an original layout, with optional side features joined by id.

    Ratings: u.data / u1.base (tab-separated user, item, rating, timestamp; no header), ratings.dat
    (`::`-separated, ml-1m/10m) or ratings.csv (header userId,movieId,rating,timestamp). `users`
    (u.user, users.dat) adds age, gender, occupation; `items` (u.item, movies.dat, movies.csv) adds
    genre_0 … genre_{genre_slots-1} and year (see the module docstring for the genre slots).
    """
    p = check_file(path)
    table = _read_ratings(p, skip_bad_rows)
    if users is not None:
        join_side(table, read_movielens_users(users, skip_bad_rows), "user_id", p)
    if items is not None:
        join_side(table, read_movielens_items(items, skip_bad_rows, genre_slots), "item_id", p)
    return table

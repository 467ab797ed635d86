"""The "Learning from Sets of Items" item_ratings.csv."""

from __future__ import annotations

from pathlib import Path

from recsys.data.readers.delimited import FLOAT, STR, read_delimited
from recsys.data.readers.files import _header, check_file
from recsys.data.readers.table import Table, _interactions
from recsys.errors import DataError


def read_learning_from_sets(path: str | Path, skip_bad_rows: bool) -> Table:
    """ "Learning from Sets of Items" item_ratings.csv: hashed string user ids, movie ids, ratings
    (header userId,movieId,rating[,tstamp|timestamp]); the user hash is kept as the raw id."""
    p = check_file(path)
    head = _header(p, ",")
    lower = {h.lower(): h for h in head}
    user = lower.get("userid") or lower.get("user_id")
    item = lower.get("movieid") or lower.get("itemid") or lower.get("item_id")
    rating = lower.get("rating")
    ts = lower.get("tstamp") or lower.get("timestamp")
    if not (user and item and rating):
        raise DataError(
            f"{p}: expected columns userId, movieId, rating (item_ratings.csv); columns present: {head}"
        )
    cols = [user, item, rating] + ([ts] if ts else [])
    types = {user: STR, item: STR, rating: FLOAT}
    if ts:
        types[ts] = STR
    tbl, bad = read_delimited(
        p,
        delimiter=",",
        columns=cols,
        types=types,
        header=True,
        required=cols,
        quoting=True,
        skip_bad_rows=skip_bad_rows,
    )
    return _interactions(p, tbl, bad, user, item, rating, ts)

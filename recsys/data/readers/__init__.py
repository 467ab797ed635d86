"""Readers of every raw source kind → one columnar `Table` of raw values, one module per format family.

- `table`: the `Table` every reader returns; concat/slice; column conversions (log1p of counts, …).
- `files`: existence checks, sha256 in the background, first line / header of a file.
- `delimited`: the shared CSV/TSV machinery (pyarrow fast path, line-by-line path naming `file:line`).
- `side`: side files joined by user/item id; multi-valued fields as k single-valued slots.
- `criteo`, `movielens`, `recbole`, `learning_from_sets`, `parquet_csv` (source kind `table`).
- `source`: a source config → its reader (`read_source`, streamed: `iter_source`).
"""

from recsys.data.readers.criteo import iter_criteo, read_criteo
from recsys.data.readers.delimited import FLOAT, INT, MAX_BAD_EXAMPLES, STR, iter_delimited, read_delimited
from recsys.data.readers.files import check_file, sha256_file
from recsys.data.readers.learning_from_sets import read_learning_from_sets
from recsys.data.readers.movielens import (
    ML100K_GENRES,
    genre_names,
    read_movielens,
    read_movielens_items,
    read_movielens_users,
)
from recsys.data.readers.parquet_csv import iter_table, read_table
from recsys.data.readers.recbole import RECBOLE_TYPES, read_recbole, read_recbole_side, recbole_fields
from recsys.data.readers.side import SideTable, join_side, quantile_tokens, split_tokens, token_slots
from recsys.data.readers.source import STREAMED_KINDS, iter_source, read_source
from recsys.data.readers.table import Table, concat_tables, log1p_dense, slice_table

__all__ = [
    "FLOAT",
    "INT",
    "MAX_BAD_EXAMPLES",
    "ML100K_GENRES",
    "RECBOLE_TYPES",
    "STR",
    "STREAMED_KINDS",
    "SideTable",
    "Table",
    "check_file",
    "concat_tables",
    "genre_names",
    "iter_criteo",
    "iter_delimited",
    "iter_source",
    "iter_table",
    "join_side",
    "log1p_dense",
    "quantile_tokens",
    "read_criteo",
    "read_delimited",
    "read_learning_from_sets",
    "read_movielens",
    "read_movielens_items",
    "read_movielens_users",
    "read_recbole",
    "read_recbole_side",
    "read_source",
    "read_table",
    "recbole_fields",
    "sha256_file",
    "slice_table",
    "split_tokens",
    "token_slots",
]

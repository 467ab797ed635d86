"""Readers of every raw source kind → one columnar `Table` of raw values (see the modules for each format)."""

from recsys.data.readers.delimited import *  # noqa: F403  (interim: the split into modules follows)

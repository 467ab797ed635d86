"""The file prepare's per-row limit on histories (data.history.max_rows) stops it with one line that
names the field and points at the Spark path, whose commands exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from recsys.data.history import SPARK_PATH
from recsys.data.prepare import prepare
from recsys.errors import UserError
from tests.test_history import make_cfg, write_events


def test_history_beyond_max_rows_points_at_spark(tmp_path: Path) -> None:
    write_events(tmp_path / "events.csv", rows=300)
    cfg = make_cfg(tmp_path / "events.csv", tmp_path / "out", chunk_rows=64)
    capped = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"history": cfg.data.history.model_copy(update={"max_rows": 100})}
            )
        }
    )
    with pytest.raises(UserError, match=r"data\.history\.max_rows = 100 .*--spark"):
        prepare(capped, overwrite=False)
    prepare(cfg, overwrite=False)  # within the limit (300 rows by default 50M): prepared


def test_the_spark_commands_named_exist() -> None:
    from recsys.cli import build_parser
    from recsys.data import spark_mds

    commands = re.findall(r"`([^`]+)`", SPARK_PATH)
    assert len(commands) == 3
    for cmd in commands:
        words = shlex.split(cmd.replace("CONFIG", "movielens-100k"))
        if words[0] == "recsys":
            build_parser().parse_args(words[1:])
        else:
            assert words[:3] == ["python", "-m", "recsys.data.spark_mds"] and callable(spark_mds.main)

"""How many tasks the Spark prepare's row shuffles use: derived from the row count, so that what one task
holds (sort buffers, spill files to merge, the rows it reads back from a persisted frame) stays the same
as the rows grow.

A fixed count (spark.sql.shuffle.partitions, 16 in the benchmark) gives each task rows / 16 rows: at 10M
rows ~625k rows (~300 MB of rows) per task, and with local[2] both tasks run inside the 1g driver JVM,
which ran out of heap in a late stage of the 10M prepare. With `tasks_for` each task of a row shuffle
gets about ROWS_PER_TASK rows, whatever the row count; more rows mean more tasks, not bigger ones.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

# Rows one task of a row shuffle (joins, sorts, the block writer) handles: ~60 MB of staged rows (26
# sparse ids, 13 dense values), what a task of a 1g local[2] driver sorted without trouble at 3M rows.
ROWS_PER_TASK = 150_000
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
# Rows per cached batch of a persisted frame. A DISK_ONLY frame is read back through Spark's Java
# serializer, whose ObjectInputStream keeps every batch it read until the next stream reset (every
# spark.serializer.objectStreamReset = 100 objects): with Spark's 10,000-row batches that is up to 1M
# rows (~370 MB of staged rows) per task, which filled the 1g driver's heap at 10M rows. 1,000-row
# batches bound it to ~100k rows (~37 MB) per task.
CACHE_BATCH = "spark.sql.inMemoryColumnarStorage.batchSize"
CACHE_BATCH_ROWS = 1_000


def tasks_for(rows: int, rows_per_task: int | None = None) -> int:
    """Tasks for a shuffle of `rows` rows: about `rows_per_task` (ROWS_PER_TASK) rows each, at least one."""
    return max(1, math.ceil(rows / (rows_per_task or ROWS_PER_TASK)))


def blocks_tasks(blocks: int, block_size: int, rows_per_task: int | None = None) -> int:
    """Tasks for the block writer: whole blocks of `block_size` rows, about `rows_per_task` rows each."""
    per_task = max(1, (rows_per_task or ROWS_PER_TASK) // block_size)
    return max(1, math.ceil(blocks / per_task))


@contextlib.contextmanager
def shuffle_partitions_for(spark: SparkSession, rows: int) -> Iterator[int]:
    """Within the block, spark.sql.shuffle.partitions is at least `tasks_for(rows)` (the joins' and
    groupBys' shuffles, planned when an action runs) and persisted frames are cached in batches of
    CACHE_BATCH_ROWS rows; the session's own values are restored after. Adaptive execution still
    coalesces partitions that turn out small."""
    before = {key: spark.conf.get(key) for key in (SHUFFLE_PARTITIONS, CACHE_BATCH)}
    wanted = max(int(before[SHUFFLE_PARTITIONS] or 200), tasks_for(rows))
    spark.conf.set(SHUFFLE_PARTITIONS, str(wanted))
    spark.conf.set(CACHE_BATCH, str(CACHE_BATCH_ROWS))
    try:
        yield wanted
    finally:
        for key, value in before.items():
            spark.conf.set(key, value)

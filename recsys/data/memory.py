"""What prepare's vocabulary state holds, in bytes: the figure `recsys bench prepare-scale` subtracts
from peak RSS to show the memory that must not grow with the row count ("beyond the vocabularies").

The state is the id counters of pass 1 (every distinct raw id seen on train, before min_count, with its
count) and, once fixed, the tables pass 2 looks ids up in (sorted keys, their rows and the vocabulary's
ids; string ids' hashed tables in both). Counted from the arrays' own buffers (numpy nbytes, Arrow buffer sizes): what the allocators
keep around them, and the temporaries of a merge or a sort, are not in it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from recsys.data.hashing import TableMap
    from recsys.data.vocab import IdCounter

#: Called by prepare at the end of each phase ("pass 1", "vocabularies", "pass 2") with the bytes the
#: vocabulary state held at its largest in that phase (see `prepare(on_phase=…)`).
PhaseHook = Callable[[str, int], None]


def _nbytes(value: Any) -> int:
    """Bytes of one numpy or Arrow array's buffers (0 for anything else)."""
    if isinstance(value, np.ndarray):
        return int(value.nbytes)
    if isinstance(value, pa.Array | pa.ChunkedArray):
        return int(value.get_total_buffer_size())
    return 0


def counter_bytes(counter: IdCounter) -> int:
    """Bytes an IdCounter holds: its keys or ids and counts while counting, its look-up after `finish`
    (with the hashed tables of string ids, recsys.data.id_lookup, in either)."""
    parts = (counter.keys, counter.counts, counter.ids)
    fixed = (getattr(counter, name, None) for name in ("_sorted_keys", "_sorted_rows", "vocab"))
    hashed = (getattr(counter, name, None) for name in ("_seen", "_lookup"))
    return sum(_nbytes(v) for v in (*parts, *fixed)) + sum(h.nbytes for h in hashed if h is not None)


def tables_bytes(counters: Iterable[IdCounter], maps: Iterable[TableMap] = ()) -> int:
    """Bytes of the vocabulary state: every counter, plus the ids a table holds beside its counter's."""
    total = sum(counter_bytes(c) for c in counters)
    for m in maps:
        if m.ids is not getattr(m.counter, "vocab", None):  # capped tables list their own ids
            total += _nbytes(m.ids)
    return total

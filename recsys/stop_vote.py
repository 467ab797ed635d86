"""The ranks' per-batch "did any rank get SIGTERM?" agreement, one batch behind so it never blocks a step.

A blocking all-reduce before every batch cost 4-4.4 ms of a 2-rank step (bench train-scale's preempt
column, 26 x 100k tables, CPU/gloo): the fastest rank waits there for the slowest. Started async at
batch k and read at batch k+1, the vote's collective runs on gloo's own thread during the step, and
every rank still reads the same votes in the same order, so all stop before the same batch.
"""

from __future__ import annotations

from typing import Any

import torch


class StopVote:
    """Votes over `group` (recsys.distributed.control_group(); None alone: no vote, the flag decides)."""

    def __init__(self, group: Any) -> None:
        self.group = group
        self._pending: tuple[Any, torch.Tensor] | None = None

    def cast(self, flag: bool) -> bool:
        """Before a batch: True when the previous batch's vote found a rank that asked to stop (alone:
        `flag` itself); otherwise start this batch's vote and return False."""
        if self.group is None:
            return flag
        if self._collect():
            return True
        import torch.distributed as dist

        t = torch.tensor([int(flag)], dtype=torch.int32)
        work = dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group, async_op=True)
        self._pending = (work, t)
        return False

    def settle(self) -> bool:
        """Wait for the outstanding vote (if any); True when it found a rank that asked to stop."""
        return self._collect()

    def _collect(self) -> bool:
        # apart from settle(), so a bench timing cast() and settle() never counts a wait twice
        if self._pending is None:
            return False
        work, t = self._pending
        self._pending = None
        work.wait()
        return bool(t.item())

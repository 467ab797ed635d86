"""recsys.stop_vote: on 2 real gloo ranks, a stop asked on one rank before batch k stops both ranks
before batch k+1 (the vote is read one batch after it starts, so it overlaps the step)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import free_port

WORKER = r"""
import os, sys, time
import torch.distributed as dist
from datetime import timedelta
from recsys.stop_vote import StopVote

dist.init_process_group("gloo", timeout=timedelta(seconds=60))
rank = dist.get_rank()
vote = StopVote(dist.new_group(backend="gloo"))
stopped_before = None
for k in range(10):
    if vote.cast(rank == 1 and k == 3):  # rank 1 gets "SIGTERM" before batch 3
        stopped_before = k
        break
    if rank == 0 and k == 2:
        time.sleep(0.5)  # rank 0 lags while rank 1 asks: the votes still line up
print(f"RANK {rank} stopped before {stopped_before}", flush=True)
alone = StopVote(None)
assert alone.cast(True) and not alone.cast(False) and not alone.settle()
dist.destroy_process_group()
"""


def test_a_stop_on_one_rank_stops_both_before_the_next_batch() -> None:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "--no-python", sys.executable, "-c", WORKER,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks share torchrun's stdout: their lines can run together, so match the records, not lines
    found = sorted(re.findall(r"RANK (\d) stopped before (\d+|None)", proc.stdout))
    assert found == [("0", "4"), ("1", "4")], proc.stdout

"""Several trainings on one host without colliding in mosaicml-streaming's shared memory.

streaming names a dataset's shared memory by the first free host-wide number (`000000_locals`, …):
it looks for a free number, then creates it, so two jobs starting at once can pick the same one
("File exists", "cannot mmap an empty file"). Its `clean_stale_shared_memory()` unlinks every such
name, including a live job's. Here, on each host:

- one job at a time finds and registers its numbers: the local leader (LOCAL_RANK 0) holds an
  exclusive lock on `/dev/shm/recsys-streaming-registry.lock` while the dataset is built;
- every recsys process holds a shared lock on `/dev/shm/recsys-streaming-alive.lock` while it lives, and
  stale memory is removed only when the exclusive lock on it can be had (no other recsys job runs),
  and then only the names no process maps (/proc/*/maps), so other programs' live memory stays.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from recsys.errors import UserError

REGISTRY_LOCK = "recsys-streaming-registry.lock"
ALIVE_LOCK = "recsys-streaming-alive.lock"
#: Longest wait for another job to finish building its dataset (it takes seconds).
REGISTRY_TIMEOUT_S = 600.0

_alive_fd: int | None = None  # held (shared) until the process exits; inherited by loader workers


def _lock_dir() -> Path:
    """Where the locks live: beside what they guard, /dev/shm, so exactly the processes that share one
    /dev/shm share the locks. Pods (and the operator-contract test's pods) each have their own, so the
    leaders of two nodes of one job never wait on each other's lock while meeting in a barrier."""
    if os.environ.get("RECSYS_LOCK_DIR"):
        return Path(os.environ["RECSYS_LOCK_DIR"])
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def _lock_path(name: str) -> Path:
    return _lock_dir() / name


def _open(name: str) -> int:
    return os.open(_lock_path(name), os.O_RDWR | os.O_CREAT, 0o666)


def _mapped_shm() -> set[str]:
    """Names under /dev/shm that some process on this host has mapped (it is alive and using them)."""
    names = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # the process ended, or is not ours to read
            continue
        names.update(
            line.rsplit("/dev/shm/", 1)[1].split(" ")[0] for line in text.splitlines() if "/dev/shm/" in line
        )
    return names


def _clean_stale() -> int:
    """Unlink streaming's shared memory that no process maps any more (left by dead jobs)."""
    from streaming.base.constant import SHM_TO_CLEAN

    shm_dir = Path("/dev/shm")
    if not shm_dir.is_dir():
        return 0
    pattern = re.compile(rf"^\d{{6}}_({'|'.join(map(re.escape, SHM_TO_CLEAN))})$")
    in_use = _mapped_shm()
    removed = 0
    # Every number, not only from 0 up to the first gap (as streaming's cleaner stops).
    for path in shm_dir.iterdir():
        if pattern.match(path.name) and path.name not in in_use:
            with contextlib.suppress(FileNotFoundError, PermissionError):
                path.unlink()
                removed += 1
    return removed


def _mark_alive(clean: bool) -> None:
    """Take this process's shared 'alive' lock; with `clean`, first remove stale memory when no other
    job is alive."""
    global _alive_fd
    if _alive_fd is not None:
        return
    fd = _open(ALIVE_LOCK)
    try:
        if clean:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _clean_stale()
    except BlockingIOError:
        pass  # another recsys job is alive: what looks stale may be its memory
    fcntl.flock(fd, fcntl.LOCK_SH)  # converts the exclusive lock, or waits out another's cleaning
    _alive_fd = fd


@contextlib.contextmanager
def streaming_setup(barrier: object = None) -> Iterator[None]:
    """Around building a StreamingDataset on every rank: the local leader holds the host's registry
    lock (and cleans stale memory when alone); `barrier` (a callable over the job's ranks) makes the
    other ranks look for numbers only once the leader holds the lock."""
    leader = int(os.environ.get("LOCAL_RANK", "0") or 0) == 0
    sync = barrier if callable(barrier) else (lambda: None)
    fd = None
    if leader:
        fd = _open(REGISTRY_LOCK)
        deadline = time.monotonic() + REGISTRY_TIMEOUT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise UserError(
                        f"{_lock_path(REGISTRY_LOCK)}: another job has held it for {REGISTRY_TIMEOUT_S:.0f} s "
                        "while building its dataset; is it stuck? (remove the lock file if no job runs)"
                    ) from None
                time.sleep(0.05)
    _mark_alive(clean=leader)
    try:
        sync()
        yield
        sync()
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

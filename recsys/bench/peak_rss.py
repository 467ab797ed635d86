"""Peak resident memory of a bench's processes, from /proc/PID/status (Linux).

Not getrusage's ru_maxrss: after vfork + exec (how Python's subprocess starts children) a child's
ru_maxrss keeps its parent's peak, so a bench parent that generated the data would set the child's figure.
"""

from __future__ import annotations


def status_kb(key: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status in KiB (VmRSS: now, VmHWM: the peak since the last reset)."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> bool:
    """Set this process's peak-RSS mark (VmHWM) to its current RSS (Linux >= 4.0); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_kb() -> int:
    """This process's peak RSS in KiB: VmHWM where Linux has it, else getrusage's ru_maxrss (KiB on Linux;
    elsewhere a child's ru_maxrss may be its parent's, see above)."""
    import os
    import resource

    if os.path.exists("/proc/self/status"):
        return status_kb("VmHWM")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

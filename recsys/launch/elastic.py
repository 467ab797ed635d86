"""torchrun with the exit status a preempted pod needs: 128 + the signal (143 after SIGTERM), not 1.

On SIGTERM torchrun's elastic agent forwards the signal to its workers, waits for them (they checkpoint
and exit 143, recsys.preemption) and then re-raises SignalException, which Python turns into exit 1.
A pod's exit status is its PID 1's: with 1, Kubernetes' restartPolicy ExitCode (PyTorchJob, JobSet)
and a Job's podFailurePolicy treat the preemption as a permanent failure; 128-255 are retryable. So
this runs torch.distributed.run's own main in-process and maps that exception (and a worker group
that failed only by preemption exits) to the signal's status. Arguments are torchrun's.

    python -m recsys.launch.elastic --nproc-per-node 2 -m recsys train --config c.yaml
"""

from __future__ import annotations

import sys

from recsys.errors import PREEMPTED_EXIT

#: How this module is started in a command line, in place of `torchrun`.
TORCHRUN = ["python", "-m", "recsys.launch.elastic"]


def exit_code(error: BaseException) -> int | None:
    """The status for a torchrun exception: 128 + signal for a signal, 143 when every failed worker
    exited after a preemption checkpoint (or by SIGTERM); None for any other failure."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    if isinstance(error, SignalException):
        return 128 + int(error.sigval)
    if isinstance(error, ChildFailedError):
        codes = {f.exitcode for f in error.failures.values()}
        if codes and codes <= {PREEMPTED_EXIT, -15}:  # -15: the worker was ended by SIGTERM itself
            return PREEMPTED_EXIT
    return None


def main(argv: list[str] | None = None) -> int:
    """`torch.distributed.run.main(argv)`; its status, mapped as `exit_code` says."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(sys.argv[1:] if argv is None else argv)
    except (SignalException, ChildFailedError) as e:
        code = exit_code(e)
        if code is None:
            raise
        print(f"recsys: torchrun stopped by preemption ({type(e).__name__}); exiting {code}", file=sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    sys.exit(main())

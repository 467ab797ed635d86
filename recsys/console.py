"""What the console shows: progress and results, not library warnings that are not the user's to act on.

`quiet_libraries()` filters the known ones narrowly, by message; `recsys --verbose` (or
RECSYS_VERBOSE=1, which torchrun workers inherit) shows everything. Causes that are ours are fixed at
the source instead (the planner's topology and storage reservation in recsys/distributed.py).
"""

from __future__ import annotations

import logging
import os
import warnings

# (category, message regex): each is a library's own deprecation notice or a note about its internals.
_WARNINGS = [
    # TorchRec's DMP passes broadcast_buffers to DDP itself.
    (FutureWarning, r"`broadcast_buffers` is deprecated"),
    # TorchRec 1.9's embedding state dicts are ShardedTensors; torch announces DTensor instead.
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),
    # fbgemm's optional SSD/CUDA kernels that a CPU build does not have.
    (DeprecationWarning, r"(?s).*Failed to import: fbgemm_gpu"),
    (DeprecationWarning, r"(?s).*fbgemm_gpu.split_table_batched_embeddings_ops is now DEPRECATED"),
    # torchmetrics 1.0.3 (pinned by torchrec) gathers AUC state across ranks with list indexing.
    (UserWarning, r"Using a non-tuple sequence for multidimensional indexing"),
    # TorchRec inputs (KeyedJaggedTensor) cannot be torch.export-ed, so models are logged as pickles
    # (loaded only from the project's own MLflow store).
    (UserWarning, r"Saving pytorch model by Pickle"),
]
_LOGGERS = {
    "torch.fx._symbolic_trace": logging.ERROR,  # "is_fx_tracing will return true for both …"
    "mlflow.pytorch": logging.ERROR,  # the pickle-format notice above, logged rather than warned
    "mlflow.store.db.utils": logging.WARNING,  # "Creating initial MLflow database tables..." of a new sqlite store
}


def verbose() -> bool:
    """True when library warnings should be shown (RECSYS_VERBOSE=1)."""
    return os.environ.get("RECSYS_VERBOSE", "") not in ("", "0")


def quiet_libraries() -> None:
    """Hide the known library warnings unless verbose; call once per process, early."""
    if verbose():
        return
    for category, message in _WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, level in _LOGGERS.items():
        logging.getLogger(name).setLevel(level)

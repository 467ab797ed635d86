"""KServe InferenceService of the two-stage model (`recsys serve build --ranker-run-id`: retrieve → rank in
one MLflow pyfunc, recsys.retrieval.serve_two_stage), and of any served model that runs torch.

The two stages stay one predictor: the ranker's features are the retrieval list itself (each candidate's
score, rank, gap to the top, item-to-item similarity to the user's items), so splitting them into two
services (a KServe InferenceGraph) would send N candidates per request over the network and need a custom
transformer to rebuild what `rank.score_table` computes in process. What differs from the retrieval
model's InferenceService (recsys.launch.kserve): the default name (`recsys-<config name>-two-stage`, the
registered model's name), the component label, and RECSYS_SERVE_TORCH_THREADS in the container (torch
intra-op threads per server worker, 1 unless --torch-threads: docs/guides/two-stage-serving.md).
"""

from __future__ import annotations

import argparse
from typing import Any

from recsys.config import Config
from recsys.errors import UserError

#: Suffix of the two-stage model's registered name and of its InferenceService's default name.
TWO_STAGE_SUFFIX = "-two-stage"
#: The component label of a two-stage InferenceService (recsys.launch.kserve.IMAGE_NEEDS reads it).
TWO_STAGE_COMPONENT = "serving-two-stage"
#: Torch threads per server worker when --two-stage is given without --torch-threads.
DEFAULT_TORCH_THREADS = 1


def torch_env(threads: int | None) -> dict[str, str]:
    """The container env setting the served model's torch threads; {} when `threads` is None."""
    from recsys.retrieval.serve import TORCH_THREADS_ENV

    if threads is None:
        return {}
    if threads < 1:
        raise UserError(f"--torch-threads {threads}: must be >= 1 (torch intra-op threads per server worker)")
    return {TORCH_THREADS_ENV: str(threads)}


def inference_service_for(cfg: Config, args: argparse.Namespace) -> dict[str, Any]:
    """The InferenceService of `recsys serve render` options: the retrieval model's, or with --two-stage
    the two-stage model's (name, label, torch threads)."""
    from recsys.launch.kserve import inference_service

    two_stage = bool(getattr(args, "two_stage", False))
    threads = getattr(args, "torch_threads", None)
    if two_stage and threads is None:
        threads = DEFAULT_TORCH_THREADS
    name = args.name or (f"recsys-{cfg.name}{TWO_STAGE_SUFFIX}".replace("_", "-") if two_stage else None)
    doc = inference_service(
        cfg, args.storage_uri, name, args.namespace, args.image, args.service_account, torch_env(threads)
    )
    if two_stage:
        doc["metadata"]["labels"]["app.kubernetes.io/component"] = TWO_STAGE_COMPONENT
    return doc

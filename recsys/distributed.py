"""The one module that touches process groups, devices, the sharding planner and DistributedModelParallel.

Rank, local rank and world size come from the environment torchrun (or a PyTorchJob/TrainJob pod, or
Spark's TorchDistributor) sets; a plain `recsys train` is rank 0 of 1 over an in-memory store (no port to race for).
gloo on CPU, nccl on CUDA with the device bound to `cuda:LOCAL_RANK`.

TorchRec version notes: this is written against torchrec 1.9.2 (CPU here). The GPU images may carry
torchrec 1.6.x. What is used here — EmbeddingShardingPlanner.collective_plan, Topology(local_world_size),
apply_optimizer_in_backward, DMP.fused_optimizer, KeyedOptimizerWrapper/CombinedOptimizer,
ShardedTensor.gather — exists in 1.6 too; the marked "1.9" spots are the ones to re-check there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from recsys.config import Config, OptimizerConfig
from recsys.errors import UserError


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    local_rank: int
    world_size: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the one that logs and writes."""
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserError(f"environment variable {name}={raw!r} is not an integer") from None


# The collective timeout of the default group, for the groups made later (new_group would use torch's).
_TIMEOUT: timedelta | None = None


def init_distributed(device: str = "auto", timeout_s: float | None = None) -> DistEnv:
    """Join (or create) the default process group; returns this process's DistEnv.

    `device` is cfg.train.device: auto picks CUDA when present. `timeout_s` (train.collective_timeout_s)
    bounds how long a collective waits for a peer; None keeps torch's default (10 min for gloo/nccl).
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", world_size)
    if not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise UserError("train.device is 'cuda' but CUDA is not available here (use auto or cpu)")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
        backend = "nccl"
    else:
        dev, backend = torch.device("cpu"), "gloo"
    global _TIMEOUT
    if not dist.is_initialized():
        _TIMEOUT = timedelta(seconds=timeout_s) if timeout_s else None
        if "MASTER_ADDR" in os.environ:
            store, _, _ = next(dist.rendezvous("env://", rank=rank, world_size=world_size))
        elif world_size > 1:
            raise UserError(
                f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: start several processes with "
                "torchrun (or `recsys launch --backend local`)"
            )
        else:
            # A process on its own needs no TCP store (a free port picked here could be taken by
            # another process before the store binds it).
            store = dist.HashStore()
        # torchrun keeps its store across worker restarts; without a per-attempt prefix the restarted
        # workers read the dead ones' gloo addresses and hang ("Connection refused").
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            backend=backend,
            store=dist.PrefixStore(f"recsys/attempt_{attempt}", store),
            rank=rank,
            world_size=world_size,
            device_id=dev if use_cuda else None,
            **({"timeout": _TIMEOUT} if _TIMEOUT else {}),
        )
    return DistEnv(rank, local_rank, world_size, local_world_size, dev, backend)


def cleanup() -> None:
    """Leave the process group (idempotent)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sum of a list of floats over all ranks (float64)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t.tolist()


def all_reduce_min(value: int) -> int:
    """The smallest of an integer over all ranks."""
    t = torch.tensor([value], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def control_group() -> Any:
    """A gloo group of its own for small control decisions (e.g. "stop now?"): its collectives never
    interleave with the model's (nccl on GPU, or a pipeline's) and run on CPU tensors. None alone."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo", timeout=_TIMEOUT)
    return None


def all_reduce_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def all_gather_ids(t: torch.Tensor) -> torch.Tensor:
    """Every rank's 1-D tensor (lengths may differ), concatenated in rank order; collective."""
    world = dist.get_world_size()
    n = torch.tensor([t.numel()], dtype=torch.int64, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    counts = [int(x.item()) for x in sizes]
    padded = torch.zeros(max(counts), dtype=t.dtype, device=t.device)
    padded[: t.numel()] = t
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded)
    return torch.cat([o[:c] for o, c in zip(out, counts, strict=True)])


# ---------------------------------------------------------------------------------- planner and DMP
# data_parallel is left out of the default on purpose: TorchRec gives data-parallel tables to the
# dense optimizer (the fused sparse optimizer never sees them), so train.sparse_optimizer would be
# silently ignored for small tables. Allow it explicitly via train.sharding.types when wanted.
_CPU_DEFAULT_TYPES = ["table_wise", "column_wise"]


def _constraints(cfg: Config, table_names: list[str], env: DistEnv) -> dict[str, Any]:
    return planner_constraints(cfg, table_names, env.device.type)


def compute_kernels(cfg: Config) -> list[str]:
    """Embedding kernels the planner may choose: fused tables in device memory (dense for
    data-parallel ones), plus UVM caching when train.sharding.uvm_caching allows it."""
    kernels = ["fused", "dense"]
    if cfg.train.sharding.uvm_caching:
        kernels.append("fused_uvm_caching")
    return kernels


def planner_constraints(cfg: Config, table_names: list[str], device_type: str) -> dict[str, Any]:
    """ParameterConstraints per table from cfg.train.sharding, for a job on `device_type` (cpu/cuda)."""
    from torchrec.distributed.planner.types import ParameterConstraints

    allowed = cfg.train.sharding.types
    if allowed is None and device_type == "cpu":
        # gloo has no reduce-scatter, which row-wise sharding needs.
        allowed = _CPU_DEFAULT_TYPES
    unknown = sorted(set(cfg.train.sharding.per_table) - set(table_names))
    if unknown:
        raise UserError(f"train.sharding.per_table: unknown tables {unknown} (tables: {table_names})")
    out = {}
    for name in table_names:
        types = cfg.train.sharding.per_table.get(name, allowed)
        if device_type == "cpu" and types and any(t in ("row_wise", "table_row_wise") for t in types):
            raise UserError(
                f"train.sharding: {name} allows {types}; row-wise sharding needs reduce-scatter, which "
                "gloo (CPU) lacks — use table_wise, column_wise or data_parallel on CPU"
            )
        # Without an explicit kernel list the planner may pick kernels the trainer does not set up
        # (plain UVM, key-value, SSD tables) whenever HBM is short.
        out[name] = ParameterConstraints(
            sharding_types=list(types) if types is not None else None,
            compute_kernels=compute_kernels(cfg),
            min_partition=cfg.train.sharding.min_partition,
        )
    return out


def _sparse_optimizer_class(opt: OptimizerConfig, device: torch.device) -> tuple[type, dict[str, Any]]:
    import torchrec.optim as trec_optim

    if opt.name == "adam" and device.type == "cpu":
        # fbgemm's CPU embedding kernels implement SGD and (row-wise) Adagrad only.
        raise UserError(
            "train.sparse_optimizer.name: 'adam' is not supported by the fused embedding optimizers on "
            "CPU; use rowwise_adagrad, adagrad or sgd"
        )

    kwargs: dict[str, Any] = {"lr": opt.lr}
    if opt.name == "sgd":
        return torch.optim.SGD, kwargs
    if opt.name == "adagrad":
        return torch.optim.Adagrad, {**kwargs, "eps": opt.eps}
    if opt.name == "rowwise_adagrad":
        return trec_optim.RowWiseAdagrad, {**kwargs, "eps": opt.eps}
    if opt.name == "adam":
        return torch.optim.Adam, {**kwargs, "eps": opt.eps}
    raise UserError(f"train.sparse_optimizer.name: unsupported {opt.name!r}")


def _dense_optimizer(opt: OptimizerConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    if opt.name == "sgd":
        return torch.optim.SGD(params, lr=opt.lr, weight_decay=opt.weight_decay)
    if opt.name == "adagrad":
        return torch.optim.Adagrad(params, lr=opt.lr, eps=opt.eps, weight_decay=opt.weight_decay)
    if opt.name == "adam":
        return torch.optim.Adam(params, lr=opt.lr, eps=opt.eps, weight_decay=opt.weight_decay)
    raise UserError(
        f"train.dense_optimizer.name: {opt.name!r} is for embedding tables; use sgd, adagrad or adam"
    )


def shard_model(model: nn.Module, cfg: Config, env: DistEnv) -> tuple[nn.Module, str]:
    """Fuse the sparse optimizer into the tables, plan collectively with the real topology, wrap in DMP.

    Returns (the DistributedModelParallel module, the plan as text). Every rank gets the same plan
    (`collective_plan` computes it on rank 0 and broadcasts it).
    """
    from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders

    tables = fuse_sparse_optimizer(model, cfg, env.device)
    if env.world_size > 1:
        from recsys.models.tables import IdRemapper

        for module in model.modules():
            if isinstance(module, IdRemapper):  # replicas learn from every rank's ids, so they agree
                module.gather = all_gather_ids
    sharders = get_default_sharders()
    plan = make_planner(cfg, env, tables).collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=model, device=env.device, plan=plan, sharders=sharders)
    return dmp, format_plan(plan)


def fuse_sparse_optimizer(model: nn.Module, cfg: Config, device: torch.device) -> list[str]:
    """Attach train.sparse_optimizer to every table (applied in backward, as fbgemm fuses it); returns
    the table names. The planner reads the optimizer from the parameters to size its state."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward

    tables: list[str] = []
    sparse_params: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, EmbeddingBagCollection):
            tables += [c.name for c in module.embedding_bag_configs()]
            sparse_params += list(module.parameters())
        elif isinstance(module, EmbeddingCollection):  # the item table shared with `history`
            tables += [c.name for c in module.embedding_configs()]
            sparse_params += list(module.parameters())
    opt_cls, opt_kwargs = _sparse_optimizer_class(cfg.train.sparse_optimizer, device)
    apply_optimizer_in_backward(opt_cls, sparse_params, opt_kwargs)
    return tables


def make_planner(cfg: Config, env: DistEnv | None, tables: list[str], topology: Any = None) -> Any:
    """The EmbeddingShardingPlanner of a job: its topology (world, local world, device; or `topology`,
    e.g. a target cluster's with its memory and bandwidths) and cfg's constraints."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation

    if topology is None:
        assert env is not None, "make_planner needs the DistEnv or a topology"
        topology = _topology(env)
    return EmbeddingShardingPlanner(
        topology=topology,
        batch_size=cfg.train.batch_size,
        constraints=planner_constraints(cfg, tables, topology.compute_device),
        # Chosen explicitly: the default heuristic over-estimates dense tensors built on `meta` and
        # warns about it; 15% of each device's memory is kept free for activations and buffers.
        storage_reservation=FixedPercentageStorageReservation(percentage=0.15),
    )


def _topology(env: DistEnv) -> Any:
    """The planner's Topology, built the way TorchRec asks (TopologyFactory, "1.9"; older: directly)."""
    try:
        from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
    except ImportError:
        from torchrec.distributed.planner import Topology

        return Topology(
            world_size=env.world_size, local_world_size=env.local_world_size, compute_device=env.device.type
        )
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=env.world_size, local_world_size=env.local_world_size),
        kernel_config=KernelConfig(compute_device=env.device.type),
    )


def format_plan(plan: Any) -> str:
    """One line per table: module, table, sharding type, kernel and the ranks holding it."""
    lines = [f"{'module':<28} {'table':<22} {'sharding':<14} {'kernel':<10} ranks"]
    for module_path, params in plan.plan.items():
        for table, ps in params.items():
            ranks = sorted(set(ps.ranks or [])) if ps.ranks else "all"
            lines.append(
                f"{module_path or '<root>':<28} {table:<22} {ps.sharding_type:<14} {ps.compute_kernel:<10} {ranks}"
            )
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------- optimizers
class LRSchedule:
    """Linear warmup then none/linear/cosine decay to 0 at `total_steps`, applied to every param group."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup: int, decay: str, total_steps: int) -> None:
        self.optimizer = optimizer
        self.warmup = warmup
        self.decay = decay
        self.total = max(total_steps, 1)
        self.base = [g["lr"] for g in optimizer.param_groups]
        self.set(0)

    def factor(self, step: int) -> float:
        """Multiplier of the peak LR at 0-based `step`."""
        if self.warmup and step < self.warmup:
            return (step + 1) / self.warmup
        if self.decay == "none":
            return 1.0
        span = max(self.total - self.warmup, 1)
        progress = min(max(step - self.warmup, 0) / span, 1.0)
        if self.decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    def set(self, step: int) -> None:
        """Set the LR of every group for `step` (the fused optimizer reads it at zero_grad/step)."""
        f = self.factor(step)
        for group, base in zip(self.optimizer.param_groups, self.base, strict=True):
            group["lr"] = base * f


def make_optimizer(dmp: nn.Module, cfg: Config, total_steps: int) -> tuple[Any, LRSchedule]:
    """CombinedOptimizer([fused sparse, dense]) and the LR schedule over both (as dlrm_main does)."""
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter

    dense_params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dense = KeyedOptimizerWrapper(
        dense_params, lambda params: _dense_optimizer(cfg.train.dense_optimizer, list(params))
    )
    optimizer = CombinedOptimizer([dmp.fused_optimizer, dense])
    return optimizer, LRSchedule(optimizer, cfg.train.warmup_steps, cfg.train.decay, total_steps)


# ------------------------------------------------------------------------------------------ gather
def _strip(key: str) -> str:
    for prefix in ("module.", "_dmp_wrapped_module."):
        while key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def gather_state_dict(dmp: nn.Module, env: DistEnv) -> dict[str, torch.Tensor] | None:
    """The full, unsharded state dict on rank 0 (None elsewhere); collective, call on every rank.

    torchrec 1.9 returns ShardedTensor for table-/column-wise tables on CPU ("1.9": newer releases
    and some GPU plans return DTensor, handled too
    — DTensor.full_tensor). Replicated (data-parallel) tensors are taken as they are.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torch.distributed.tensor import DTensor

    out: dict[str, torch.Tensor] = {}
    for key, value in dmp.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype, device=env.device) if env.is_main else None
            value.gather(dst=0, out=full)
            tensor = full
        elif isinstance(value, DTensor):
            tensor = value.full_tensor()
        else:
            tensor = value
        if env.is_main and tensor is not None:
            out[_strip(key)] = tensor.detach().cpu().clone()
    return out if env.is_main else None

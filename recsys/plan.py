"""`recsys plan`: TorchRec's sharding planner for a target cluster, run here (no GPU needed).

For a config and a cluster (nodes × GPUs per node, HBM and host memory per GPU, bandwidths; presets
for H100/H200 nodes) and tables from the prepared metadata or declared sizes (so Criteo 1TB can be
planned before it is prepared), the same planner the trainer runs (recsys.distributed.make_planner:
the config's sharding constraints, the fused sparse optimizer, the 15% reservation) prints per table
the sharding type, compute kernel and ranks, per rank HBM and host memory, and the planner's step
estimate — or one line saying why it does not fit and what to change. The plan can be written as
JSON (`recsys render --size-from-plan` sizes the pods' memory from it) and logged to MLflow.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.metadata import Metadata

GIB = 1024**3
# MLPerf DLRM's Criteo 1TB tables: rows per categorical feature with the 40M-row cap (ids beyond it are
# hashed into it), as in facebookresearch/dlrm torchrec_dlrm's README.
CRITEO_1TB = [
    40000000, 39060, 17295, 7424, 20265, 3, 7122, 1543, 63, 40000000, 3067956, 405282, 10,
    2209, 11938, 155, 4, 976, 14, 40000000, 40000000, 40000000, 590152, 12973, 108, 36,
]  # fmt: skip
PRESETS = {"criteo-1tb": CRITEO_1TB}
# What a training process holds in host memory besides its tables: Python, torch/CUDA libraries and
# context, the loader's blocks and pinned buffers (1.3-1.5 GiB measured on CPU by bench-train; a CUDA
# process holds more). Added per process when sizing pods; --host-overhead-gb changes it.
HOST_OVERHEAD_GIB = 4.0
HOST_MARGIN = 1.2  # × table host memory: allocator slack, checkpoint copies (async save stages a copy)


@dataclass(frozen=True)
class Hardware:
    """Per-GPU memory and bandwidths of a node type (GB/s = 1e9 bytes/s)."""

    hbm_gib: float
    ddr_gib: float
    hbm_bw_gbs: float
    hbm_to_ddr_gbs: float
    intra_bw_gbs: float
    inter_bw_gbs: float


# Public figures: H100 SXM5 80 GB (79.1 GiB visible to CUDA), HBM3 3.35 TB/s; H200 141 GB (~139.8 GiB),
# HBM3e 4.8 TB/s; both NVLink 4 (450 GB/s each way per GPU), PCIe Gen5 x16 to host (~55 GB/s usable),
# one 400 Gb/s NIC per GPU between nodes (50 GB/s); 2 TiB host memory per 8-GPU node (256 GiB per GPU).
HARDWARE = {
    "h100": Hardware(79.1, 256, 3350, 55, 450, 50),
    "h200": Hardware(139.8, 256, 4800, 55, 450, 50),
}


@dataclass(frozen=True)
class Cluster:
    """The target topology: nodes × GPUs (or CPU processes) and per-device memory and bandwidths."""

    nodes: int
    procs_per_node: int
    device: str  # cuda or cpu
    hbm_gib: float
    ddr_gib: float
    intra_bw_gbs: float
    inter_bw_gbs: float
    hbm_bw_gbs: float = 3350
    hbm_to_ddr_gbs: float = 55
    hardware: str = "custom"

    @property
    def world_size(self) -> int:
        """Ranks in the job."""
        return self.nodes * self.procs_per_node

    def describe(self) -> str:
        """One line: size, device and memory per rank."""
        if self.device == "cpu":
            return f"{self.nodes} node(s) × {self.procs_per_node} CPU process(es), {self.ddr_gib:g} GiB host memory per process"
        return (
            f"{self.nodes} node(s) × {self.procs_per_node} GPU(s) ({self.hardware}: {self.hbm_gib:g} GiB HBM, "
            f"{self.ddr_gib:g} GiB host memory per GPU; NVLink {self.intra_bw_gbs:g} GB/s, network "
            f"{self.inter_bw_gbs:g} GB/s per GPU)"
        )


@dataclass
class TablePlan:
    """Where one table goes."""

    name: str
    rows: int
    dim: int
    sharding: str
    kernel: str
    ranks: list[int]
    hbm_bytes: int
    ddr_bytes: int
    cache_load_factor: float | None = None


@dataclass
class Plan:
    """A planned job: per table placement, per rank memory, the planner's step estimate."""

    config: str
    cluster: Cluster
    batch_size: int
    tables_from: str
    tables: list[TablePlan]
    rank_hbm_bytes: list[int]
    rank_ddr_bytes: list[int]
    step_ms: float
    comms_ms: float
    compute_ms: float
    planning_seconds: float
    notes: list[str] = field(default_factory=list)
    shm_gib: float = 0.0  # the config's job.shm_size, for the printed pod memory
    checkpoints: bool = False  # whether the config's job checkpoints

    def node_ddr_bytes(self) -> list[int]:
        """Host memory the tables take on each node (the sum over its ranks)."""
        per = self.cluster.procs_per_node
        return [sum(self.rank_ddr_bytes[n * per : (n + 1) * per]) for n in range(self.cluster.nodes)]

    def pod_memory_gib(
        self, shm_gib: float = 0.0, checkpoints: bool = False, overhead_gib: float = HOST_OVERHEAD_GIB
    ) -> int:
        """Memory request/limit per pod: the busiest node's table host memory × margin (+ 1× more when
        the job checkpoints: saving and loading held the tables twice, see docs/planning.md) + a
        per-process overhead + the /dev/shm emptyDir (memory-backed, it counts against the limit), GiB."""
        tables = max(self.node_ddr_bytes(), default=0) / GIB
        factor = HOST_MARGIN + (1.0 if checkpoints else 0.0)
        return math.ceil(tables * factor + overhead_gib * self.cluster.procs_per_node + shm_gib)

    def to_json(self) -> str:
        """The plan as JSON (read back by `from_json`)."""
        return json.dumps(asdict(self), indent=1) + "\n"

    @staticmethod
    def from_json(text: str, origin: str) -> Plan:
        """A plan written by `to_json`; a file that is not one is a UserError naming it."""
        try:
            data = json.loads(text)
            data["cluster"] = Cluster(**data["cluster"])
            data["tables"] = [TablePlan(**t) for t in data["tables"]]
            return Plan(**data)
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{origin}: not a plan written by `recsys plan --output` ({e})") from None


# ------------------------------------------------------------------------------------------ tables
def parse_tables(spec: str) -> list[tuple[str, int]]:
    """Declared tables: a preset (criteo-1tb), `N×ROWS` / `NxROWS` (t0…), or `name=rows,name=rows`."""
    spec = spec.strip()
    if spec in PRESETS:
        return [(f"cat_{i}", n) for i, n in enumerate(PRESETS[spec])]
    m = re.fullmatch(r"(\d+)\s*[x×]\s*([\d_]+)", spec)
    if m:
        return [(f"t{i}", int(m.group(2))) for i in range(int(m.group(1)))]
    out = []
    for part in spec.split(","):
        name, eq, rows = part.partition("=")
        if not eq or not name.strip() or not rows.strip().replace("_", "").isdigit():
            raise UserError(
                f"--tables {spec!r}: expected a preset ({', '.join(PRESETS)}), N×ROWS (e.g. 26x1000000) "
                "or name=rows,name=rows"
            )
        out.append((name.strip(), int(rows.strip())))
    return out


def declared_metadata(cfg: Config, tables: list[tuple[str, int]], num_dense: int) -> Metadata:
    """A Metadata describing declared tables (nothing read from disk), enough to build the model."""
    from recsys.data.metadata import Metadata, SparseFeature, SplitInfo

    names = [n for n, _ in tables]
    user = item = None
    if cfg.model.kind == "two_tower":
        user, item = cfg.model.two_tower.user_features[0], cfg.model.two_tower.item_features[0]
        missing = [f for f in (user, item) if f not in names]
        if missing:
            raise UserError(f"--tables: a Two-Tower plan needs tables named {missing} (model.two_tower)")
    empty = SplitInfo(rows=0, blocks=0, positives=0)
    return Metadata(
        name=cfg.name,
        kind="ctr" if cfg.model.kind == "dlrm" else "interactions",
        block_size=cfg.data.block_size,
        dense_features=[f"int_{i}" for i in range(num_dense)],
        sparse_features=[SparseFeature(name=n, num_embeddings=r, vocab_file="") for n, r in tables],
        user_feature=user,
        item_feature=item,
        splits={s: empty for s in ("train", "val", "test")},
        sources=[],
    )


def plan_metadata(
    cfg: Config, tables: str | None, max_rows: int | None, num_dense: int
) -> tuple[Metadata, str]:
    """The tables to plan: declared (`tables`), else the prepared metadata; rows capped at max_rows."""
    from recsys.data.metadata import metadata_path, read_metadata

    if tables:
        meta, origin = declared_metadata(cfg, parse_tables(tables), num_dense), f"declared: {tables}"
    elif metadata_path(cfg.data.prepared_dir).is_file():
        meta, origin = read_metadata(cfg.data.prepared_dir), f"{metadata_path(cfg.data.prepared_dir)}"
    else:
        raise UserError(
            f"{metadata_path(cfg.data.prepared_dir)}: not found; prepare the data first or declare the "
            "tables with --tables (e.g. criteo-1tb, 26x1000000, or name=rows,…)"
        )
    if max_rows:
        capped = [
            f.model_copy(update={"num_embeddings": min(f.num_embeddings, max_rows)})
            for f in meta.sparse_features
        ]
        meta = meta.model_copy(update={"sparse_features": capped})
        origin += f", rows capped at {max_rows:,}"
    return meta, origin


# ----------------------------------------------------------------------------------------- planner
def topology(cluster: Cluster) -> Any:
    """TorchRec's Topology of the target cluster (bandwidths in the planner's bytes/ms)."""
    from torchrec.distributed.planner.types import (
        HardwareConfig,
        KernelConfig,
        TopologyFactory,
        TrainerConfig,
    )

    per_ms = 1e9 / 1000
    return TopologyFactory.create_topology(
        TrainerConfig(world_size=cluster.world_size, local_world_size=cluster.procs_per_node),
        hardware_config=HardwareConfig(
            hbm_cap_bytes=int(cluster.hbm_gib * GIB) if cluster.device == "cuda" else 0,
            ddr_cap_bytes=int(cluster.ddr_gib * GIB),
            intra_host_bw=cluster.intra_bw_gbs * per_ms,
            inter_host_bw=cluster.inter_bw_gbs * per_ms,
            hbm_mem_bw=cluster.hbm_bw_gbs * per_ms,
            hbm_to_ddr_mem_bw=cluster.hbm_to_ddr_gbs * per_ms,
        ),
        kernel_config=KernelConfig(compute_device=cluster.device),
    )


def make_plan(cfg: Config, meta: Metadata, cluster: Cluster, tables_from: str) -> Plan:
    """Run the trainer's planner for `cluster`; a plan, or a UserError `does not fit: …`."""
    import torch
    from torchrec.distributed.model_parallel import get_default_sharders
    from torchrec.distributed.planner.types import PlannerError

    from recsys.distributed import fuse_sparse_optimizer, make_planner
    from recsys.models.task import build_task

    device = torch.device(cluster.device)
    model = build_task(cfg, meta, "meta", None, dense_device="meta")
    names = fuse_sparse_optimizer(model, cfg, device)
    planner = make_planner(cfg, None, names, topology=topology(cluster))
    t = time.perf_counter()
    try:
        planner.plan(model, get_default_sharders())
    except PlannerError as e:
        raise UserError(does_not_fit(cfg, meta, cluster, e)) from None
    seconds = time.perf_counter() - t
    plan = _summarize(cfg, meta, cluster, planner.get_selected_options(), tables_from, seconds)
    plan.shm_gib = quantity_gib(cfg.job.shm_size, "job.shm_size")
    plan.checkpoints = bool(cfg.train.checkpoint.every_steps or cfg.train.checkpoint.every_epoch)
    return plan


def _summarize(
    cfg: Config, meta: Metadata, cluster: Cluster, options: list[Any], tables_from: str, seconds: float
) -> Plan:
    """Per table and per rank figures of the planner's chosen sharding options."""
    rows = {f.name: f.num_embeddings for f in meta.sparse_features}
    hbm, ddr = [0] * cluster.world_size, [0] * cluster.world_size
    comms: dict[tuple[str, str, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    compute: dict[str, dict[int, float]] = defaultdict(lambda: defaultdict(float))
    tables = []
    for so in sorted(options, key=lambda so: list(rows).index(so.name) if so.name in rows else 0):
        ranks = sorted({s.rank for s in so.shards})
        for s in so.shards:
            hbm[s.rank] += s.storage.hbm
            ddr[s.rank] += s.storage.ddr
            # The critical path as TorchRec's planner stats compute it: ranks meet after each of
            # fwd/bwd comms (per module and sharding type) and fwd/bwd compute.
            comms[(so.module[0], so.sharding_type, "fwd")][s.rank] += s.perf.fwd_comms
            comms[(so.module[0], so.sharding_type, "bwd")][s.rank] += s.perf.bwd_comms
            compute["fwd"][s.rank] += s.perf.fwd_compute + s.perf.prefetch_compute
            compute["bwd"][s.rank] += s.perf.bwd_compute
        cache = getattr(so, "cache_params", None)
        tables.append(
            TablePlan(
                name=so.name,
                rows=rows.get(so.name, so.tensor.shape[0]),
                dim=int(so.tensor.shape[1]),
                sharding=so.sharding_type,
                kernel=so.compute_kernel,
                ranks=ranks,
                hbm_bytes=sum(s.storage.hbm for s in so.shards),
                ddr_bytes=sum(s.storage.ddr for s in so.shards),
                cache_load_factor=_cache_factor(cache) if so.compute_kernel == "fused_uvm_caching" else None,
            )
        )
    comms_ms = sum(max(v.values()) for v in comms.values())
    compute_ms = sum(max(v.values()) for v in compute.values())
    notes = []
    if any(t.kernel == "fused_uvm_caching" for t in tables):
        notes.append(
            "UVM caching: those tables live in host memory with an HBM cache of their hot rows; the step "
            "estimate assumes the planner's cache hit rate"
        )
    return Plan(
        config=cfg.name,
        cluster=cluster,
        batch_size=cfg.train.batch_size,
        tables_from=tables_from,
        tables=tables,
        rank_hbm_bytes=hbm,
        rank_ddr_bytes=ddr,
        step_ms=comms_ms + compute_ms,
        comms_ms=comms_ms,
        compute_ms=compute_ms,
        planning_seconds=seconds,
        notes=notes,
    )


def _cache_factor(cache: Any) -> float:
    """The HBM cache's share of a UVM-cached table's rows (the planner's default when not set)."""
    from torchrec.distributed.planner.constants import UVM_CACHING_RATIO

    factor = getattr(cache, "load_factor", None) if cache is not None else None
    return float(factor) if factor is not None else UVM_CACHING_RATIO


def _optimizer_factor(cfg: Config, dim: int) -> float:
    """Bytes of weights + sparse optimizer state per byte of fp32 weights."""
    name = cfg.train.sparse_optimizer.name
    return {"sgd": 1.0, "rowwise_adagrad": 1.0 + 1.0 / dim, "adagrad": 2.0, "adam": 3.0}[name]


def does_not_fit(cfg: Config, meta: Metadata, cluster: Cluster, err: Exception) -> str:
    """The one line printed when the planner finds no plan: what is needed, what there is, what to change."""
    dim = cfg.model.embedding_dim
    need = sum(f.num_embeddings for f in meta.sparse_features) * dim * 4 * _optimizer_factor(cfg, dim) / GIB
    biggest = max(meta.sparse_features, key=lambda f: f.num_embeddings)
    big = biggest.num_embeddings * dim * 4 * _optimizer_factor(cfg, dim) / GIB
    per = cluster.hbm_gib if cluster.device == "cuda" else cluster.ddr_gib
    where = "HBM" if cluster.device == "cuda" else "host memory"
    have = per * 0.85 * cluster.world_size
    kind = "storage" if "insufficient storage" in str(err).lower() else "constraints"
    fixes = ["add GPUs (--nodes/--gpus-per-node)" if cluster.device == "cuda" else "add processes or memory"]
    fixes += ["lower model.embedding_dim", "cap rows (--max-rows, hashing the tail)"]
    if cluster.device == "cuda" and not cfg.train.sharding.uvm_caching:
        fixes.append("allow UVM caching (--uvm-caching: train.sharding.uvm_caching=true)")
    if kind == "constraints":
        fixes.append(f"allow more sharding types (train.sharding.types: {cfg.train.sharding.types})")
    return (
        f"does not fit: {len(meta.sparse_features)} tables × dim {dim} need ~{need:,.1f} GiB with "
        f"{cfg.train.sparse_optimizer.name} state (largest: {biggest.name}, {biggest.num_embeddings:,} rows, "
        f"{big:,.1f} GiB); {cluster.world_size} × {per:g} GiB {where} leaves {have:,.1f} GiB after the 15% "
        f"reservation (planner: {kind}) — " + " / ".join(fixes)
    )


# ------------------------------------------------------------------------------------------ output
def _gib(n: float) -> str:
    return f"{n / GIB:,.2f}"


def _ranks(ranks: list[int]) -> str:
    if len(ranks) > 2 and ranks == list(range(ranks[0], ranks[-1] + 1)):
        return f"{ranks[0]}-{ranks[-1]}"
    return ",".join(map(str, ranks))


def format_plan(plan: Plan) -> str:
    """The plan as text: per table, per rank, per node, the step estimate."""
    c = plan.cluster
    lines = [
        f"plan for {plan.config} on {c.describe()}",
        f"tables: {plan.tables_from}; batch {plan.batch_size} per rank ({plan.batch_size * c.world_size:,} global); "
        f"planned in {plan.planning_seconds:.1f} s",
        "",
        f"{'table':<24} {'rows':>12} {'dim':>4} {'sharding':<15} {'kernel':<18} {'ranks':<10} {'HBM GiB':>9} {'host GiB':>9}",
    ]
    for t in plan.tables:
        kernel = t.kernel + (f" ({t.cache_load_factor:.0%})" if t.cache_load_factor else "")
        lines.append(
            f"{t.name:<24} {t.rows:>12,} {t.dim:>4} {t.sharding:<15} {kernel:<18} {_ranks(t.ranks):<10} "
            f"{_gib(t.hbm_bytes):>9} {_gib(t.ddr_bytes):>9}"
        )
    lines += [
        "",
        f"{'rank':>4} {'HBM GiB':>9} {'host GiB':>9}   (tables and optimizer state; + the 15% reservation)",
    ]
    for r in range(c.world_size):
        lines.append(f"{r:>4} {_gib(plan.rank_hbm_bytes[r]):>9} {_gib(plan.rank_ddr_bytes[r]):>9}")
    lines += [
        "",
        f"max per rank: HBM {_gib(max(plan.rank_hbm_bytes))} GiB of {c.hbm_gib if c.device == 'cuda' else 0:g}, "
        f"host {_gib(max(plan.rank_ddr_bytes))} GiB of {c.ddr_gib:g}",
        f"step estimate (planner, embeddings only): {plan.step_ms:.2f} ms = comms {plan.comms_ms:.2f} + "
        f"compute {plan.compute_ms:.2f} (critical path over ranks)",
        f"pod memory (recsys render --size-from-plan): {plan.pod_memory_gib(plan.shm_gib, plan.checkpoints)}Gi "
        f"= the busiest node's table host memory × {HOST_MARGIN + plan.checkpoints:g}"
        f"{' (checkpoints hold it twice)' if plan.checkpoints else ''} + {HOST_OVERHEAD_GIB:g} GiB × "
        f"{c.procs_per_node} processes + job.shm_size {plan.shm_gib:g} GiB",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines) + "\n"


def log_plan(cfg: Config, plan: Plan, text: str) -> str | None:
    """Log the plan to MLflow (params, metrics, plan.txt/plan.json) when tracking is configured
    (tracking.uri or $MLFLOW_TRACKING_URI); returns the run id, or None when not logged."""
    if not cfg.tracking.enabled or not (cfg.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")):
        return None
    from recsys.tracking import make_tracker

    tracker = make_tracker(cfg, 0)
    c = plan.cluster
    with tracker.start(f"{cfg.name}-plan", {"kind": "plan", "model": cfg.model.kind}):
        tracker.log_params(
            {
                "plan.nodes": c.nodes, "plan.procs_per_node": c.procs_per_node, "plan.device": c.device,
                "plan.hardware": c.hardware, "plan.hbm_gib": c.hbm_gib, "plan.ddr_gib": c.ddr_gib,
                "plan.batch_size": plan.batch_size, "plan.tables_from": plan.tables_from[:500],
                **{f"plan.table.{t.name}": f"{t.sharding}/{t.kernel}/{_ranks(t.ranks)}" for t in plan.tables},
            }
        )  # fmt: skip
        tracker.log_metrics(
            {
                "plan/step_ms": plan.step_ms,
                "plan/max_rank_hbm_gib": max(plan.rank_hbm_bytes) / GIB,
                "plan/max_rank_host_gib": max(plan.rank_ddr_bytes) / GIB,
                "plan/pod_memory_gib": float(plan.pod_memory_gib()),
            }
        )
        tracker.log_text(text, "plan/plan.txt")
        tracker.log_text(plan.to_json(), "plan/plan.json")
        return tracker.run_id


def cluster_from_args(args: Any, cfg: Config) -> Cluster:
    """The Cluster of `recsys plan`'s flags (a hardware preset, then explicit overrides; the job section by default)."""
    nodes = args.nodes or cfg.job.nodes
    gpus = args.gpus_per_node if args.gpus_per_node is not None else cfg.job.gpus_per_node
    hw = HARDWARE[args.hardware]
    if gpus == 0:
        # A CPU job: each process gets its share of the pod's memory (job.memory) unless told otherwise;
        # gloo moves data over TCP, taken as 10 GB/s within and between nodes.
        procs = cfg.job.procs_per_node
        ddr = args.ddr_gb or quantity_gib(cfg.job.memory, "job.memory") / procs
        return Cluster(nodes, procs, "cpu", 0, ddr, args.intra_bw or 10, args.inter_bw or 10, hardware="cpu")
    return Cluster(
        nodes=nodes,
        procs_per_node=gpus,
        device="cuda",
        hbm_gib=args.hbm_gb or hw.hbm_gib,
        ddr_gib=args.ddr_gb or hw.ddr_gib,
        intra_bw_gbs=args.intra_bw or hw.intra_bw_gbs,
        inter_bw_gbs=args.inter_bw or hw.inter_bw_gbs,
        hbm_bw_gbs=hw.hbm_bw_gbs,
        hbm_to_ddr_gbs=hw.hbm_to_ddr_gbs,
        hardware=args.hardware,
    )


def main(args: Any, cfg: Config) -> int:
    """`recsys plan`: print the plan (or the one line why it does not fit), write/log it."""
    if args.uvm_caching:
        cfg.train.sharding.uvm_caching = True
    meta, origin = plan_metadata(cfg, args.tables, args.max_rows, args.num_dense)
    cluster = cluster_from_args(args, cfg)
    plan = make_plan(cfg, meta, cluster, origin)
    text = format_plan(plan)
    print(text, end="")
    if args.output:
        Path(args.output).write_text(plan.to_json())
        print(f"plan written to {args.output} (recsys render --size-from-plan {args.output})")
    run_id = log_plan(cfg, plan, text)
    print(
        f"logged to MLflow run {run_id}"
        if run_id
        else "not logged to MLflow (set tracking.uri or MLFLOW_TRACKING_URI)"
    )
    return 0


def pod_memory_override(cfg: Config, plan_file: str) -> str:
    """`job.memory=<N>Gi` from a plan file, after checking it was planned for this job's size."""
    path = Path(plan_file)
    if not path.is_file():
        raise UserError(
            f"--size-from-plan {plan_file}: file not found (write it with `recsys plan --output`)"
        )
    plan = Plan.from_json(path.read_text(), plan_file)
    c, job = plan.cluster, cfg.job
    procs = job.gpus_per_node or job.procs_per_node
    if (c.nodes, c.procs_per_node) != (job.nodes, procs):
        raise UserError(
            f"--size-from-plan {plan_file}: planned for {c.nodes} node(s) × {c.procs_per_node}, but the job is "
            f"{job.nodes} × {procs} (job.nodes, job.gpus_per_node); re-plan with --nodes/--gpus-per-node"
        )
    shm = quantity_gib(job.shm_size, "job.shm_size")
    ck = cfg.train.checkpoint
    return f"job.memory={plan.pod_memory_gib(shm, bool(ck.every_steps or ck.every_epoch))}Gi"


def quantity_gib(value: str, where: str) -> float:
    """A Kubernetes memory quantity (e.g. 8Gi, 512Mi, 2G) in GiB."""
    units = {
        "": 1 / GIB,
        "Ki": 1 / 1024**2,
        "Mi": 1 / 1024,
        "Gi": 1,
        "Ti": 1024,
        "K": 1e3 / GIB,
        "M": 1e6 / GIB,
        "G": 1e9 / GIB,
        "T": 1e12 / GIB,
    }
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([KMGT]i?)?", value.strip())
    if not m:
        raise UserError(f"{where}: {value!r} is not a memory quantity like 8Gi or 512Mi")
    return float(m.group(1)) * units[m.group(2) or ""]

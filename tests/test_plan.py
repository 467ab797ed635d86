"""`recsys plan`: TorchRec's planner for a target cluster on this CPU machine — fits, does not fit,
UVM caching, the rendered pod memory, MLflow logging and the Criteo 1TB plans."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from recsys.cli import main as cli_main
from recsys.config import load_config
from recsys.errors import UserError
from recsys.plan import GIB, Cluster, Plan, make_plan, parse_tables, plan_metadata

H100 = Cluster(1, 2, "cuda", 79.1, 256, 450, 50, hardware="h100")


def _plan(cluster: Cluster, tables: str, *sets: str) -> Plan:
    cfg = load_config("dlrm_synth", ["model.embedding_dim=64", "model.dlrm.dense_arch_layers=[32,64]", *sets])
    meta, origin = plan_metadata(cfg, tables, None, 13)
    return make_plan(cfg, meta, cluster, origin)


def test_quantities() -> None:
    from recsys.plan import quantity_gib

    assert quantity_gib("8Gi", "x") == 8 and quantity_gib("512Mi", "x") == 0.5
    with pytest.raises(UserError, match="job.shm_size: 'lots'"):
        quantity_gib("lots", "job.shm_size")


def test_declared_tables_parse() -> None:
    assert parse_tables("3x1000") == [("t0", 1000), ("t1", 1000), ("t2", 1000)]
    assert parse_tables("a=10,b=2_000") == [("a", 10), ("b", 2000)]
    criteo = parse_tables("criteo-1tb")
    assert len(criteo) == 26 and max(r for _, r in criteo) == 40_000_000
    with pytest.raises(UserError, match="expected a preset"):
        parse_tables("a=ten")


def test_small_cluster_table_wise_puts_each_table_whole_on_one_gpu() -> None:
    plan = _plan(H100, "4x100000", "train.sharding.types=[table_wise]")
    assert [t.sharding for t in plan.tables] == ["table_wise"] * 4
    assert all(len(t.ranks) == 1 and t.kernel == "fused" for t in plan.tables)
    assert {r for t in plan.tables for r in t.ranks} == {0, 1}, "spread over both GPUs"
    table_bytes = 100_000 * 64 * 4 * (1 + 1 / 64)  # weights + row-wise Adagrad state
    assert sum(plan.rank_hbm_bytes) >= 4 * table_bytes
    assert sum(plan.rank_ddr_bytes) == 0
    assert plan.step_ms > 0


def test_column_wise_splits_a_table_over_ranks() -> None:
    per_table = "train.sharding.per_table={t_a: [column_wise], t_b: [table_wise]}"
    plan = _plan(H100, "a=100000,b=1000", per_table, "train.sharding.min_partition=32")
    a, b = plan.tables
    assert (a.sharding, b.sharding) == ("column_wise", "table_wise")
    assert a.ranks == [0, 1], "the columns of `a` on both GPUs"


def test_giant_tables_on_one_gpu_do_not_fit_then_fit_with_uvm_caching() -> None:
    one = Cluster(1, 1, "cuda", 8, 256, 450, 50, hardware="h100")
    with pytest.raises(UserError) as e:
        _plan(one, "4x20000000")
    msg = str(e.value)
    assert msg.startswith("does not fit: 4 tables × dim 64 need ~19.")
    assert "\n" not in msg and "allow UVM caching" in msg and "add GPUs" in msg

    plan = _plan(one, "4x20000000", "train.sharding.uvm_caching=true")
    cached = [t for t in plan.tables if t.kernel == "fused_uvm_caching"]
    assert cached, "some tables live in host memory behind an HBM cache"
    assert all(t.ddr_bytes > t.hbm_bytes and t.cache_load_factor for t in cached)
    assert max(plan.rank_hbm_bytes) <= 8 * GIB
    assert max(plan.rank_ddr_bytes) >= sum(t.ddr_bytes for t in cached)


def test_trainer_constraints_follow_uvm_caching() -> None:
    from recsys.distributed import planner_constraints

    cfg = load_config("dlrm_synth")
    assert planner_constraints(cfg, ["t"], "cuda")["t"].compute_kernels == ["fused", "dense"]
    cfg.train.sharding.uvm_caching = True
    assert "fused_uvm_caching" in planner_constraints(cfg, ["t"], "cuda")["t"].compute_kernels


def test_cli_plan_writes_json_and_render_sizes_pods_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "plan.json"
    sets = ["job.nodes=1", "job.gpus_per_node=1", "job.procs_per_node=1", "tracking.enabled=false"]
    args = ["--config", "dlrm_synth", *[a for s in sets for a in ("--set", s)]]
    rc = cli_main(["plan", *args, "--tables", "4x20000000", "--hbm-gb", "2", "--uvm-caching", "-o", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "fused_uvm_caching" in printed and "step estimate" in printed and "not logged to MLflow" in printed
    plan = Plan.from_json(out.read_text(), str(out))
    # dlrm_synth: job.shm_size 8Gi (memory-backed), checkpoints every epoch (saves hold tables twice)
    gib = plan.pod_memory_gib(shm_gib=8, checkpoints=True)
    assert gib * GIB > 2 * max(plan.rank_ddr_bytes) + 8 * GIB, "UVM tables (twice while saving) + /dev/shm"

    manifest = tmp_path / "job.yaml"
    rc = cli_main(
        ["render", "--backend", "pytorchjob", *args, "--size-from-plan", str(out), "-o", str(manifest)]
    )
    assert rc == 0
    docs = list(yaml.safe_load_all(manifest.read_text()))
    job = next(d for d in docs if d["kind"] == "PyTorchJob")
    res = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]["resources"]
    assert res["requests"]["memory"] == res["limits"]["memory"] == f"{gib}Gi"
    assert f"job.memory={gib}Gi" in manifest.read_text().splitlines()[0], "the header reproduces it"

    # A plan made for another job size is refused in one line.
    rc = cli_main(
        ["render", "--backend", "pytorchjob", *args, "--set", "job.nodes=2", "--size-from-plan", str(out)]
    )
    assert rc == 2
    assert "planned for 1 node(s) × 1, but the job is 2 × 1" in capsys.readouterr().err


def test_plan_is_logged_to_mlflow(tmp_path: Path) -> None:
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    rc = cli_main(
        ["plan", "--config", "dlrm_synth", "--set", f"tracking.uri={uri}", "--set", "tracking.experiment=plans",
         "--tables", "4x1000", "--nodes", "1", "--gpus-per-node", "2"]
    )  # fmt: skip
    assert rc == 0
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("plans").experiment_id])
    assert run.data.params["plan.procs_per_node"] == "2" and run.data.metrics["plan/step_ms"] > 0
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "plan/plan.json", str(tmp_path))).read_text()
    )
    assert len(logged["tables"]) == 4


@pytest.mark.parametrize("nodes", [2, 1])
def test_criteo_1tb_plan_on_h100_nodes(nodes: int) -> None:
    """MLPerf's Criteo 1TB tables (40M-row cap, dim 128) on nodes × 8 H100 (docs/planning.md)."""
    cfg = load_config(
        "criteo_kaggle", ["model.embedding_dim=128", "model.dlrm.dense_arch_layers=[512,256,128]"]
    )
    meta, origin = plan_metadata(cfg, "criteo-1tb", None, 13)
    plan = make_plan(cfg, meta, Cluster(nodes, 8, "cuda", 79.1, 256, 450, 50, hardware="h100"), origin)
    assert len(plan.tables) == 26 and len(plan.rank_hbm_bytes) == nodes * 8
    big = [t for t in plan.tables if t.rows == 40_000_000]
    assert len(big) == 5 and all(t.kernel == "fused" for t in plan.tables)
    # The five 19 GiB tables never share a GPU.
    assert len({r for t in big for r in t.ranks}) >= 5
    assert max(plan.rank_hbm_bytes) < 0.85 * 79.1 * GIB

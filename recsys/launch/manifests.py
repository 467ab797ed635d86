"""Regenerate every committed generated manifest from the shipped configs: `python -m recsys.launch.manifests`.

Each target is exactly one `recsys render` command (written into the file's first line), so a file can
be reproduced by hand; tests/test_manifests_fresh.py fails when a committed file differs from a fresh
render. The flagship jobs (manifests/*.yaml) train on real data at a realistic size (criteo_kaggle,
movielens_25m); their synthetic twins (manifests/synth/) serve the demo data and the CPU overlay. The
hand-written cluster plumbing (manifests/base/, the data-prep Jobs) is not touched here.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The synthetic jobs (demo data, no downloads) are small GPU jobs (2 nodes × 1 GPU); manifests/overlays/cpu
# re-sizes them for CPU clusters. The flagship jobs take their size from their config's job section.
SYNTH_GPU_SIZE = ("job.nodes=2", "job.gpus_per_node=1")


@dataclass(frozen=True)
class Target:
    """One generated file: `recsys render --backend BACKEND --config CONFIG --set … -o PATH`."""

    path: str
    config: str
    backend: str
    overrides: tuple[str, ...]


# Flagship: real data prepared by manifests/base/data-prep-job.yaml from raw files on the data PVC.
FLAGSHIP = [
    Target("manifests/dlrm-job.yaml", "criteo_kaggle", "pytorchjob", ()),
    Target("manifests/two-tower-job.yaml", "movielens_25m", "pytorchjob", ()),
    Target("manifests/dlrm-trainjob.yaml", "criteo_kaggle", "trainjob", ()),
    Target("manifests/two-tower-trainjob.yaml", "movielens_25m", "trainjob", ()),
]
# Synthetic: the demo's configs, prepared by manifests/synth/data-prep-job.yaml (no raw files needed).
SYNTH = [
    Target("manifests/synth/dlrm-job.yaml", "dlrm_synth", "pytorchjob", SYNTH_GPU_SIZE),
    Target("manifests/synth/two-tower-job.yaml", "two_tower_synth", "pytorchjob", SYNTH_GPU_SIZE),
    Target("manifests/synth/dlrm-trainjob.yaml", "dlrm_synth", "trainjob", SYNTH_GPU_SIZE),
    Target("manifests/synth/two-tower-trainjob.yaml", "two_tower_synth", "trainjob", SYNTH_GPU_SIZE),
]
# The Spark prepare of the flagship Criteo data as a Spark Operator SparkApplication (`--data-prep spark`): the
# same config with a `table` source over a Parquet copy of train.txt (docs/guides/spark-data-prep.md makes it).
CRITEO_PARQUET = (
    "data.source={kind: table, path: data/raw/criteo/train.parquet, label: label, "
    f"dense: [{', '.join(f'I{i}' for i in range(1, 14))}], sparse: [{', '.join(f'C{i}' for i in range(1, 27))}]}}"
)
DATA_PREP = [
    Target(
        "manifests/data-prep-spark.yaml",
        "criteo_kaggle",
        "data-prep-spark",
        (CRITEO_PARQUET, "data.prepared_dir=data/criteo-kaggle-spark"),
    )
]
TARGETS = FLAGSHIP + SYNTH  # the training jobs
GENERATED = TARGETS + DATA_PREP


def render_target(target: Target) -> str:
    """The text `recsys render` writes for `target` (the same call the CLI makes)."""
    from recsys.config import load_config
    from recsys.launch.kube import render_command, render_text

    cfg = load_config(target.config, list(target.overrides))
    if target.backend == "data-prep-spark":
        from recsys.launch import spark_app

        cmd = spark_app.render_command(target.config, list(target.overrides), target.path)
        return spark_app.render_text(cfg, cmd, target.path)
    cmd = render_command(target.config, target.backend, list(target.overrides), target.path)
    return render_text(cfg, target.backend, cmd, target.path)  # type: ignore[arg-type]


def stale(root: Path = REPO) -> list[str]:
    """Paths of committed generated files that are missing or differ from a fresh render."""
    out = []
    for t in GENERATED:
        f = root / t.path
        if not f.is_file() or f.read_text() != render_target(t):
            out.append(t.path)
    return out


def main(argv: list[str] | None = None) -> int:
    """Write every target (or, with --check, list the stale ones and exit 1)."""
    p = argparse.ArgumentParser(prog="python -m recsys.launch.manifests", description=__doc__)
    p.add_argument("--check", action="store_true", help="only report files that differ from a fresh render")
    args = p.parse_args(argv)
    if args.check:
        bad = stale()
        for path in bad:
            print(f"stale: {path} (run `make manifests`)", file=sys.stderr)
        return 1 if bad else 0
    for t in GENERATED:
        text = render_target(t)
        out = REPO / t.path
        out.parent.mkdir(parents=True, exist_ok=True)
        changed = not out.is_file() or out.read_text() != text
        out.write_text(text)
        print(f"{'wrote' if changed else 'unchanged'} {t.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

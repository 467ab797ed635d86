"""`make demo` / `python -m recsys.demo`: the local flow on CPU, start to finish.

synthesize → prepare MDS (skipped when already prepared from the same config) → Two-Tower with 2
ranks under torchrun → DLRM (2 ranks) → a table of metrics beside the baselines (and the data's
Bayes AUC), the top-10 items for 3 users from the logged embeddings, and how to open the runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys.config import Config, dump_config, load_config


def ensure_prepared(cfg: Config) -> str:
    """Prepare cfg's data unless its prepared_dir already holds data prepared with the same data settings."""
    from recsys.data.metadata import data_settings, metadata_path, read_metadata
    from recsys.data.prepare import prepare

    if metadata_path(cfg.data.prepared_dir).is_file():
        meta = read_metadata(cfg.data.prepared_dir)
        if meta.settings == data_settings(cfg):
            return (
                f"{cfg.data.prepared_dir}: already prepared ({meta.splits['train'].rows} train rows), reused"
            )
        prepare(cfg, overwrite=True)
        return f"{cfg.data.prepared_dir}: held data prepared with other settings ({meta.name!r}); re-prepared"
    prepare(cfg, overwrite=False)
    return f"{cfg.data.prepared_dir}: prepared"


def torchrun(cfg: Config, nproc: int) -> None:
    """`python -m torch.distributed.run --nproc-per-node N -m recsys train --config <resolved.yaml>`."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{cfg.name}.yaml"
        path.write_text(dump_config(cfg))
        cmd = [
            sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
            # A fresh run each time: the demo must not continue an interrupted earlier one.
            "-m", "recsys", "train", "--config", str(path), "--resume", "never",
        ]  # fmt: skip
        print("$", " ".join(cmd[1:]), flush=True)
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        subprocess.run(cmd, env=env, check=True)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _latest_run(cfg: Config, run_name: str) -> str:
    import mlflow

    from recsys.tracking import resolve_tracking_uri

    client = mlflow.MlflowClient(resolve_tracking_uri(cfg))
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id


def _results(cfg: Config, run_id: str) -> dict[str, dict[str, float]]:
    from recsys.retrieval.runs import download
    from recsys.tracking import resolve_tracking_uri

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(download(run_id, resolve_tracking_uri(cfg), "results.json", tmp).read_text())


def top_items(cfg: Config, run_id: str, n_users: int = 3, k: int = 10) -> list[tuple[str, list[str]]]:
    """Top-k raw item ids for the first `n_users` test users, from the run's logged embeddings."""
    import numpy as np
    import pandas as pd
    import torch

    from recsys.data.loader import read_split_arrays
    from recsys.data.metadata import read_metadata
    from recsys.metrics import top_k
    from recsys.retrieval.runs import download
    from recsys.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        emb = {
            side: pd.read_parquet(download(run_id, uri, f"embeddings/{side}_embeddings.parquet", tmp))
            for side in ("user", "item")
        }
    meta = read_metadata(cfg.data.prepared_dir)
    uc, ic = meta.sparse_index(meta.user_feature or ""), meta.sparse_index(meta.item_feature or "")
    train = read_split_arrays(cfg.data.prepared_dir, "train")["sparse"]
    test = read_split_arrays(cfg.data.prepared_dir, "test")["sparse"]
    users = list(dict.fromkeys(test[:, uc].tolist()))[:n_users]
    u = emb["user"].set_index("row").loc[users]
    user_emb = torch.tensor(np.stack(u["embedding"].to_numpy()))
    item_emb = torch.tensor(np.stack(emb["item"]["embedding"].to_numpy()))
    item_row = emb["item"]["row"].to_numpy()
    pos = {int(r): j for j, r in enumerate(item_row)}
    seen = {
        j: [pos[int(i)] for i in train[train[:, uc] == user, ic] if int(i) in pos]
        for j, user in enumerate(users)
    }
    _, idx = top_k(user_emb, item_emb, exclude=seen, k=k)
    ids = emb["item"]["id"].to_numpy()
    return [
        (str(u.loc[user, "id"]), [str(ids[j]) for j in row if j >= 0])
        for user, row in zip(users, idx.tolist(), strict=True)
    ]


def _row(name: str, model: float, base: float | None, note: str = "") -> str:
    b = f"{base:.4f}" if base is not None else "-"
    return f"  {name:<16} {model:>9.4f} {b:>10}  {note}"


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit status."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dlrm-ranks", type=int, default=2, help="processes for the DLRM (1 or 2)")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    tt = load_config("two_tower_synth")
    dl = load_config("dlrm_synth")
    tt.tracking.run_name = f"demo-two-tower-{int(time.time())}"
    dl.tracking.run_name = f"demo-dlrm-{int(time.time())}"
    for cfg in (tt, dl):
        print(ensure_prepared(cfg), flush=True)

    print("\n== Two-Tower, 2 ranks (gloo) ==", flush=True)
    torchrun(tt, 2)
    tt_run = _latest_run(tt, tt.tracking.run_name)
    print(f"\n== DLRM, {args.dlrm_ranks} rank(s) ==", flush=True)
    torchrun(dl, args.dlrm_ranks)
    dl_run = _latest_run(dl, dl.tracking.run_name)

    r_tt, r_dl = _results(tt, tt_run), _results(dl, dl_run)
    print("\n== Results (test split) ==")
    print(f"  {'metric':<16} {'model':>9} {'baseline':>10}")
    m, b = r_tt["metrics"], r_tt["baselines"]
    print("Two-Tower (baseline: popularity)")
    for k in tt.eval.ks:
        for name in ("recall", "ndcg", "hitrate"):
            key = f"{name}@{k}"
            print(_row(key, m[key], b.get(key)))
    print(_row("auroc", m["auroc"], 0.5, "(sampled negatives)"))
    m, b = r_dl["metrics"], r_dl["baselines"]
    print("DLRM (baseline: constant train CTR)")
    print(
        _row(
            "auc",
            m["auc"],
            b.get("auc"),
            f"Bayes-optimal AUC of the data: {b.get('bayes_auc', float('nan')):.4f}",
        )
    )
    print(_row("logloss", m["logloss"], b.get("logloss")))
    print(_row("calibration", m["calibration"], None, "(mean prediction / mean label)"))

    print("\n== Top-10 items for 3 test users (raw ids, training items excluded) ==")
    for user, items in top_items(tt, tt_run):
        print(f"  user {user}: {' '.join(items)}")

    from recsys.tracking import local_ui_command

    print("\n== Runs ==")
    print(f"  two-tower {tt_run}, dlrm {dl_run} (experiment {tt.tracking.experiment!r})")
    print(f"  {local_ui_command(tt)}")
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Loader: TorchRec batches from MDS blocks, epochs, mid-epoch resume, exact eval partition, 2 ranks."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, free_port

from recsys.config import Config, config_from_dict
from recsys.data.loader import iter_eval_batches, make_train_loader, read_split_arrays
from recsys.data.metadata import read_metadata
from recsys.data.prepare import prepare

ROWS = 80  # random split 0.1/0.1, seed 21 → train 64 rows = 16 blocks of 4 = 8 batches of 8


def make_cfg(prepared: Path, src: Path) -> Config:
    return config_from_dict(
        {
            "name": "loader-test",
            "data": {
                "source": {
                    "kind": "table",
                    "path": str(src),
                    "label": "y",
                    "dense": ["x"],
                    "sparse": ["rowid", "c"],
                },
                "prepared_dir": str(prepared),
                # rows decide their split alone (binomial counts): seed 21 gives exactly 64/8/8 of 80
                "split": {"mode": "random", "val_fraction": 0.1, "test_fraction": 0.1, "seed": 21},
                "block_size": 4,
                "shuffle_seed": 3,
            },
            "model": {"kind": "dlrm", "embedding_dim": 4, "dlrm": {"dense_arch_layers": [4]}},
            "train": {"batch_size": 8},
            "eval": {"batch_size": 8},
        }
    )


@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Config:
    d = tmp_path_factory.mktemp("loader")
    src = d / "rows.csv"
    # x = row number identifies every row (dense survives log1p uniquely); c is a low-cardinality feature.
    src.write_text("rowid,c,x,y\n" + "".join(f"r{i},c{i % 3},{i},{i % 2}\n" for i in range(ROWS)))
    c = make_cfg(d / "prep", src)
    prepare(c, overwrite=False)
    return c


def row_ids(batch) -> list[int]:  # noqa: ANN001
    return np.rint(np.expm1(batch.dense_features[:, 0].numpy())).astype(int).tolist()


def split_ids(cfg: Config, split: str) -> list[int]:
    a = read_split_arrays(cfg.data.prepared_dir, split)
    return np.rint(np.expm1(a["dense"][:, 0])).astype(int).tolist()


def test_train_loader_yields_torchrec_batches_over_whole_epochs(cfg: Config) -> None:
    from torchrec.datasets.utils import Batch

    loader = make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), 1)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        assert len(batches) == 8
        b = batches[0]
        assert isinstance(b, Batch)
        assert b.dense_features.shape == (8, 1) and b.labels.shape == (8,)
        assert str(b.dense_features.dtype) == "torch.float32" and str(b.labels.dtype) == "torch.float32"
        kjt = b.sparse_features
        assert kjt.keys() == ["rowid", "c"] and kjt.lengths().tolist() == [1] * 16
        # labels and sparse ids travel with their row through the shuffles
        ids = row_ids(b)
        assert b.labels.tolist() == [float(i % 2) for i in ids]
        epochs.append([i for b in batches for i in row_ids(b)])
    train = split_ids(cfg, "train")
    assert sorted(epochs[0]) == sorted(train) == sorted(epochs[1])  # every train row once per epoch
    assert epochs[0] != epochs[1]  # the next epoch is a new order


def test_sparse_ids_match_their_rows(cfg: Config) -> None:
    from recsys.data.metadata import read_vocab

    meta = read_metadata(cfg.data.prepared_dir)
    rowid_vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[0])
    c_vocab = read_vocab(cfg.data.prepared_dir, meta.sparse_features[1])
    for b in make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), 1):
        ids = row_ids(b)
        assert [rowid_vocab[v] for v in b.sparse_features["rowid"].values().tolist()] == [
            f"r{i}" for i in ids
        ]
        assert [c_vocab[v] for v in b.sparse_features["c"].values().tolist()] == [f"c{i % 3}" for i in ids]


def test_resume_mid_epoch_repeats_and_skips_nothing(cfg: Config) -> None:
    a = make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), 1)
    it = iter(a)
    seen = [row_ids(next(it)) for _ in range(3)]
    state = a.state_dict()
    rest = [row_ids(b) for b in it]
    del it, a
    gc.collect()

    b = make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), 1)
    b.load_state_dict(state)
    resumed = [row_ids(x) for x in b]
    assert resumed == rest  # exactly the batches the first run would have produced, same row order
    flat = [i for batch in seen + resumed for i in batch]
    assert sorted(flat) == sorted(split_ids(cfg, "train"))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_partition_is_exact(cfg: Config, world: int) -> None:
    for split in ("train", "val", "test"):
        results = [
            iter_eval_batches(cfg, read_metadata(cfg.data.prepared_dir), split, r, world)
            for r in range(world)
        ]
        steps = {s for s, _ in results}
        assert len(steps) == 1  # every rank runs the same number of steps
        got = []
        for n, it in results:
            batches = list(it)
            assert len(batches) == n
            real = [b for b in batches if b is not None]
            assert all(b is None for b in batches[len(real) :])  # None only after the data ends
            got += [i for b in real for i in row_ids(b)]
        assert got == split_ids(cfg, split)  # every row exactly once, in order, no padding


RANK_SCRIPT = """
import json, sys
import torch.distributed as dist
dist.init_process_group("gloo")  # as the trainer does (recsys.distributed) before building loaders
from recsys.config import load_config
from recsys.data.loader import make_train_loader
from recsys.data.metadata import read_metadata
import numpy as np
cfg = load_config(sys.argv[1])
out = []
for b in make_train_loader(cfg, read_metadata(cfg.data.prepared_dir), dist.get_world_size()):
    out.append(np.rint(np.expm1(b.dense_features[:, 0].numpy())).astype(int).tolist())
print("ROWS " + json.dumps(out))
"""


@pytest.mark.dist
def test_two_ranks_get_disjoint_rows_and_equal_batch_counts(cfg: Config, tmp_path: Path) -> None:
    cfg_file = tmp_path / "cfg.yaml"
    from recsys.config import dump_config

    cfg_file.write_text(dump_config(cfg))
    port = free_port()
    procs = []
    for rank in range(2):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": f"{REPO}:{REPO / 'tests'}",
        }
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", RANK_SCRIPT, str(cfg_file)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=300)
        assert p.returncode == 0, stderr[-3000:]
        outs.append(json.loads(next(line for line in stdout.splitlines() if line.startswith("ROWS "))[5:]))
    r0, r1 = ([i for b in o for i in b] for o in outs)
    assert len(outs[0]) == len(outs[1]) == 4  # 16 blocks / 2 ranks / 2 blocks per batch
    assert not set(r0) & set(r1)
    assert sorted(r0 + r1) == sorted(split_ids(cfg, "train"))

"""The model factory: the train task of cfg.model.kind built from the Config and the Metadata.

Lives with the models so that the trainer, the evaluators and the retrieval code all build models the
same way without importing each other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config
    from recsys.data.metadata import Metadata


def log_q_from_train(cfg: Config, meta: Metadata) -> torch.Tensor | None:
    """log item sampling probabilities from the train split, for the softmax's log-Q correction."""
    if cfg.model.kind != "two_tower" or cfg.model.two_tower.loss != "softmax":
        return None
    if not cfg.model.two_tower.logq_correction:
        return None
    from recsys.data.loader import read_split_arrays
    from recsys.models.two_tower import item_log_q

    col = meta.sparse_index(meta.item_feature or "")
    n = meta.sparse_features[col].num_embeddings
    items = read_split_arrays(cfg.data.prepared_dir, "train", meta)["sparse"][:, col]
    return item_log_q(torch.from_numpy(np.bincount(items, minlength=n)))


def build_task(
    cfg: Config,
    meta: Metadata,
    ebc_device: str | torch.device = "meta",
    item_log_q: torch.Tensor | None = None,
    dense_device: str | torch.device | None = None,
) -> nn.Module:
    """The train-task module of cfg.model.kind; tables on `ebc_device` (meta: DMP materialises them)."""
    from recsys.models.dlrm import DLRMTask, build_dlrm
    from recsys.models.two_tower import TwoTower, TwoTowerTask, make_ebc

    sparse = [(f.name, f.num_embeddings) for f in meta.sparse_features]
    m = cfg.model
    if m.kind == "dlrm":
        d = m.dlrm
        if not meta.dense_features:
            raise UserError(f"{cfg.data.prepared_dir}: DLRM needs dense features and the data has none")
        return DLRMTask(
            build_dlrm(
                sparse,
                len(meta.dense_features),
                m.embedding_dim,
                d.dense_arch_layers,
                d.over_arch_layers,
                d.interaction,
                d.dcn_num_layers,
                d.dcn_low_rank_dim,
                ebc_device=ebc_device,
                dense_device=dense_device,
            )
        )
    tt = m.two_tower
    names = [n for n, _ in sparse]
    for what, feats in (("user_features", tt.user_features), ("item_features", tt.item_features)):
        bad = [f for f in feats if f not in names]
        if bad:
            raise UserError(f"model.two_tower.{what}: {bad} not in the prepared data's features {names}")
    if meta.item_feature is None or meta.user_feature is None:
        raise UserError(
            f"{cfg.data.prepared_dir}: not interaction data (no user/item feature); Two-Tower needs one"
        )
    # Every prepared feature gets a table so the KJT the loader yields matches the sharded EBC exactly.
    model = TwoTower(
        make_ebc(sparse, m.embedding_dim, ebc_device),
        tt.user_features,
        tt.item_features,
        tt.layers,
        normalize=tt.loss == "softmax",
        dense_device=dense_device,
    )
    return TwoTowerTask(model, meta.item_feature, tt.loss, tt.temperature, item_log_q, dense_device)


def plain_model(cfg: Config, meta: Metadata, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU train task loaded with a gathered state dict (for retrieval eval and MLflow)."""
    task = build_task(cfg, meta, ebc_device="cpu", item_log_q=None)
    task.load_state_dict(state, strict=True)
    return task.eval()

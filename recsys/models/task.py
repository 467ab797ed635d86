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
    if cfg.model.kind == "sequential":
        sq = cfg.model.sequential
        if sq.softmax != "sampled" or not sq.logq_correction:
            return None
    elif (
        cfg.model.kind != "two_tower"
        or cfg.model.two_tower.loss != "softmax"
        or not cfg.model.two_tower.logq_correction
    ):
        return None
    from recsys.data.loader import read_train_arrays
    from recsys.models.two_tower import item_log_q

    col = meta.sparse_index(meta.item_feature or "")
    n = meta.sparse_features[col].num_embeddings
    items = read_train_arrays(cfg, meta)["sparse"][:, col]
    return item_log_q(torch.from_numpy(np.bincount(items, minlength=n)))


def item_feature_rows(cfg: Config, meta: Metadata) -> torch.Tensor:
    """[N, F_i] embedding rows of each item row's item-tower features, from its last train row.

    Row 0 (OOV) and items without train rows keep zeros; uniform negatives are drawn from rows 1..N-1.
    """
    from recsys.data.loader import read_train_arrays

    names = [f.name for f in meta.sparse_features]
    key = names.index(meta.item_feature or "")
    feats = [meta.item_feature] if cfg.model.kind == "sequential" else cfg.model.two_tower.item_features
    cols = [names.index(f or "") for f in feats]
    table = np.zeros((meta.sparse_features[key].num_embeddings, len(cols)), np.int64)
    sparse = read_train_arrays(cfg, meta)["sparse"]
    table[sparse[:, key]] = sparse[:, cols]
    if key in cols:  # every row, also the ones train never shows
        table[:, cols.index(key)] = np.arange(len(table))
    return torch.from_numpy(table)


def similarity_normalizes(cfg: Config) -> bool:
    """True when the towers' outputs are L2-normalised (cosine); auto: cosine for softmax, dot for bce."""
    tt = cfg.model.two_tower
    return tt.loss == "softmax" if tt.similarity == "auto" else tt.similarity == "cosine"


def logit_temperature(cfg: Config) -> float:
    """τ with logit = user·item / τ: the temperature, except for bce with dot similarity (raw scores)."""
    tt = cfg.model.two_tower
    return tt.temperature if tt.loss == "softmax" or similarity_normalizes(cfg) else 1.0


def build_task(
    cfg: Config,
    meta: Metadata,
    ebc_device: str | torch.device = "meta",
    item_log_q: torch.Tensor | None = None,
    dense_device: str | torch.device | None = None,
    training: bool = True,
) -> nn.Module:
    """The train-task module of cfg.model.kind; tables on `ebc_device` (meta: DMP materialises them).

    `training=False` (evaluation copies) skips what only training steps use (uniform negatives' table)."""
    from recsys.models.dlrm import DLRMTask, build_dlrm
    from recsys.models.two_tower import TwoTower, TwoTowerTask, make_ebc

    sparse = [(f.name, f.num_embeddings) for f in meta.sparse_features]
    m = cfg.model
    check_tables(cfg, meta)
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
            ),
            managed_collision_remapper(cfg, meta, dense_device or "cpu"),
        )
    if m.kind == "sequential":
        return build_sequential(cfg, meta, ebc_device, item_log_q, dense_device, training)
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
    if tt.history_pooling == "none":
        model = TwoTower(
            make_ebc(sparse, m.embedding_dim, ebc_device),
            tt.user_features,
            tt.item_features,
            tt.layers,
            normalize=similarity_normalizes(cfg),
            dense_device=dense_device,
        )
    else:
        model = history_two_tower(cfg, meta, ebc_device, dense_device)
    rows = None
    if tt.num_uniform_negatives:
        if tt.loss != "softmax":
            raise UserError("model.two_tower.num_uniform_negatives: needs loss: softmax")
        if cfg.train.pipeline:
            # The pipeline rewrites the EBC's one call on the batch; a second lookup needs a plain loop.
            raise UserError("model.two_tower.num_uniform_negatives: needs train.pipeline: false")
        rows = item_feature_rows(cfg, meta) if training else None
    return TwoTowerTask(
        model,
        meta.item_feature,
        tt.loss,
        tt.temperature,
        item_log_q,
        dense_device,
        embedding_l2=tt.embedding_l2,
        num_uniform_negatives=tt.num_uniform_negatives,
        item_rows=rows,
        logq_correction=tt.logq_correction,
    )


def check_tables(cfg: Config, meta: Metadata) -> None:
    """model.tables must name the data's features and agree with how the data was prepared."""
    names = [f.name for f in meta.sparse_features]
    unknown = sorted(set(cfg.model.tables) - set(names))
    if unknown:
        raise UserError(
            f"model.tables.{unknown[0]}: no sparse feature {unknown[0]!r} in the data (features: {names})"
        )
    for f in meta.sparse_features:
        spec = cfg.model.table(f.name)
        rows = spec.max_rows if spec.kind != "exact" else f.num_embeddings
        if spec.kind != f.table or rows != f.num_embeddings:
            raise UserError(
                f"model.tables.{f.name}: {spec.kind} table of {rows} rows, but {cfg.data.prepared_dir} was "
                f"prepared as {f.table} with {f.num_embeddings} rows; re-run `recsys data prepare --overwrite`"
            )
    if cfg.model.kind != "dlrm":
        for key in (meta.user_feature, meta.item_feature):
            if key is not None and cfg.model.table(key).kind != "exact":
                raise UserError(
                    f"model.tables.{key}: the Two-Tower's user and item ids need exact tables (retrieval "
                    "and the embedding export map rows through their vocabularies)"
                )


def managed_collision_remapper(cfg: Config, meta: Metadata, device: str | torch.device) -> nn.Module | None:
    """The IdRemapper of the data's managed-collision features (None when there are none)."""
    from recsys.models.tables import build_remapper

    specs = {}
    for f in meta.sparse_features:
        if f.table == "managed_collision":
            t = cfg.model.table(f.name)
            specs[f.name] = (f.num_embeddings, t.eviction_policy, t.eviction_interval)
    return build_remapper(specs, device)


def plain_model(cfg: Config, meta: Metadata, state: dict[str, torch.Tensor]) -> nn.Module:
    """An unsharded CPU train task loaded with a gathered state dict (for retrieval eval and MLflow)."""
    task = build_task(cfg, meta, ebc_device="cpu", item_log_q=None, training=False)
    task.load_state_dict(state, strict=True)
    return task.eval()


def _item_ec(cfg: Config, meta: Metadata, device: str | torch.device) -> nn.Module:
    """The item table as an EmbeddingCollection shared by the item feature and `history`."""
    from recsys.data.metadata import HISTORY_FEATURE
    from recsys.models.sequence import make_item_ec
    from recsys.models.two_tower import table_name

    item = meta.item_feature or ""
    rows = meta.sparse_features[meta.sparse_index(item)].num_embeddings
    return make_item_ec(table_name(item), item, HISTORY_FEATURE, rows, cfg.model.embedding_dim, device)


def _history_meta(cfg: Config, meta: Metadata) -> tuple[int, list[str]]:
    """(L, the batch KJT's keys) of a model reading histories; refuses data without them."""
    from recsys.data.metadata import HISTORY_FEATURE

    if meta.history_length is None or meta.item_feature is None:
        raise UserError(
            f"{cfg.data.prepared_dir}: prepared without histories (or not interaction data); set "
            "data.history.length and re-run `recsys data prepare --overwrite`"
        )
    return meta.history_length, [f.name for f in meta.sparse_features] + [HISTORY_FEATURE]


def history_two_tower(
    cfg: Config, meta: Metadata, ebc_device: str | torch.device, dense_device: str | torch.device | None
) -> nn.Module:
    """A Two-Tower whose user tower also pools the history (model.two_tower.history_pooling) from the
    item table, which moves to an EmbeddingCollection shared with `history`; the rest stay in the EBC."""
    from recsys.models.sequence import AttentionPooling, MeanPooling
    from recsys.models.two_tower import TwoTower, make_ebc

    m, tt = cfg.model, cfg.model.two_tower
    length, keys = _history_meta(cfg, meta)
    others = [(f.name, f.num_embeddings) for f in meta.sparse_features if f.name != meta.item_feature]
    side_dim = m.embedding_dim * len(tt.user_features)
    pool: nn.Module = (
        MeanPooling(m.embedding_dim)
        if tt.history_pooling == "mean"
        else AttentionPooling(m.embedding_dim, length, side_dim, dense_device)
    )
    return TwoTower(
        make_ebc(others, m.embedding_dim, ebc_device) if others else None,
        tt.user_features,
        tt.item_features,
        tt.layers,
        normalize=similarity_normalizes(cfg),
        dense_device=dense_device,
        ec=_item_ec(cfg, meta, ebc_device),
        history=pool,
        history_length=length,
        keys=keys,
    )


def build_sequential(
    cfg: Config,
    meta: Metadata,
    ebc_device: str | torch.device,
    item_log_q: torch.Tensor | None,
    dense_device: str | torch.device | None,
    training: bool,
) -> nn.Module:
    """model.kind sequential: a causal Transformer over the history is the user tower, the item table
    (shared with the history) the item tower; sampled (log-Q) or full softmax on dot products."""
    from recsys.models.hstu import HSTUEncoder
    from recsys.models.sequence import CausalEncoder
    from recsys.models.two_tower import TwoTower, TwoTowerTask

    sq, dim = cfg.model.sequential, cfg.model.embedding_dim
    length, keys = _history_meta(cfg, meta)
    encoder: nn.Module
    if sq.block == "hstu":
        encoder = HSTUEncoder(dim, length, sq.layers, sq.heads, sq.dropout, dense_device)
    else:
        encoder = CausalEncoder(dim, length, sq.layers, sq.heads, sq.dropout, sq.ff_mult, dense_device)
    model = TwoTower(
        None,
        [],
        [meta.item_feature or ""],
        [],
        normalize=False,
        dense_device=dense_device,
        ec=_item_ec(cfg, meta, ebc_device),
        history=encoder,
        history_length=length,
        keys=keys,
    )
    full = sq.softmax == "full"
    uniform = 0 if full else sq.num_uniform_negatives
    return TwoTowerTask(
        model,
        meta.item_feature or "",
        "softmax",
        sq.temperature,
        item_log_q,
        dense_device,
        num_uniform_negatives=uniform,
        item_rows=item_feature_rows(cfg, meta) if training and (full or uniform) else None,
        logq_correction=sq.logq_correction,
        full_softmax=full,
    )

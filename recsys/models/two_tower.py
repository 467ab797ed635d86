"""Two-Tower retrieval model: user and item towers over one EmbeddingBagCollection, and its train task.

Both towers share one EmbeddingBagCollection (one table per sparse feature) so that TorchRec's
TrainPipelineSparseDist sees a single sharded module fed straight from `batch.sparse_features`, as in
TorchRec's own retrieval example. Each tower pools its features' embeddings, concatenates them and runs
an MLP whose last layer is linear (no ReLU: embeddings must be free to take any sign).

Shapes: B = batch size, F_u / F_i = user / item features, D = embedding_dim, E = layers[-1].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def table_name(feature: str) -> str:
    """Embedding table name of a sparse feature (one table per feature)."""
    return f"t_{feature}"


def make_ebc(
    features: list[tuple[str, int]], embedding_dim: int, device: torch.device | str = "meta"
) -> EmbeddingBagCollection:
    """One sum-pooled table per (feature, num_embeddings); built on `meta` so DMP materialises it sharded."""
    tables = [
        EmbeddingBagConfig(
            name=table_name(name), embedding_dim=embedding_dim, num_embeddings=rows, feature_names=[name]
        )
        for name, rows in features
    ]
    return EmbeddingBagCollection(tables=tables, device=torch.device(device))


def mlp(in_size: int, layers: list[int], device: torch.device | str | None = None) -> nn.Sequential:
    """Linear+ReLU for the hidden layers, a plain Linear for the last one."""
    mods: list[nn.Module] = []
    size = in_size
    for i, out in enumerate(layers):
        mods.append(nn.Linear(size, out, device=device))
        if i < len(layers) - 1:
            mods.append(nn.ReLU())
        size = out
    return nn.Sequential(*mods)


class TwoTower(nn.Module):
    """User and item towers; `forward(kjt)` gives ([B, E] user, [B, E] item) embeddings.

    Args:
        ebc: one EmbeddingBagCollection holding the tables of every user and item feature.
        user_features / item_features: the sparse features pooled by each tower, in order.
        layers: MLP sizes of each tower; the last is the embedding size E.
        normalize: L2-normalise tower outputs (cosine similarity; used with the softmax loss).
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection,
        user_features: list[str],
        item_features: list[str],
        layers: list[int],
        normalize: bool,
        dense_device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        dims = {f: c.embedding_dim for c in ebc.embedding_bag_configs() for f in c.feature_names}
        missing = [f for f in user_features + item_features if f not in dims]
        if missing:
            raise ValueError(f"features {missing} have no embedding table (have {sorted(dims)})")
        self.ebc = ebc
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        self.all_features = list(dims)
        self.normalize = normalize
        self.user_mlp = mlp(sum(dims[f] for f in user_features), layers, dense_device)
        self.item_mlp = mlp(sum(dims[f] for f in item_features), layers, dense_device)

    def _tower(self, pooled: dict[str, torch.Tensor], features: list[str], net: nn.Module) -> torch.Tensor:
        out = net(torch.cat([pooled[f] for f in features], dim=1))
        return F.normalize(out, dim=-1) if self.normalize else out

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, E] user and [B, E] item embeddings of the rows of `features`."""
        user, item, _ = self.encode(features)
        return user, item

    def encode(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, E] user and item embeddings and [B] sum of squared norms of each row's pooled embeddings.

        The norms cover every feature either tower pools (for `embedding_l2`): fbgemm's fused sparse
        optimizers ignore weight decay, so the looked-up rows are penalised through the loss instead.
        """
        pooled = self.ebc(features).to_dict()
        used = dict.fromkeys(self.user_features + self.item_features)
        sq = torch.stack([pooled[f].pow(2).sum(-1) for f in used]).sum(0)
        return (
            self._tower(pooled, self.user_features, self.user_mlp),
            self._tower(pooled, self.item_features, self.item_mlp),
            sq,
        )

    def item_rows_embeddings(self, rows: torch.Tensor) -> torch.Tensor:
        """[M, E] item-tower embeddings of M items given their [M, F_i] feature rows (item_features order).

        Runs a second lookup of `ebc` (sharded or not) outside the batch's KJT: fine in a plain loop,
        not inside TrainPipelineSparseDist, which rewrites the EBC's one call on the batch.
        """
        ids = {f: rows[:, j] for j, f in enumerate(self.item_features)}
        kjt = tower_kjt(self.all_features, ids).to(rows.device)
        return self._tower(self.ebc(kjt).to_dict(), self.item_features, self.item_mlp)

    def user_embeddings(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, E] embeddings of N users given {user feature: [N] embedding rows} (unsharded model)."""
        pooled = self.ebc(tower_kjt(self.all_features, ids)).to_dict()
        return self._tower(pooled, self.user_features, self.user_mlp)

    def item_embeddings(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, E] embeddings of N items given {item feature: [N] embedding rows} (unsharded model)."""
        pooled = self.ebc(tower_kjt(self.all_features, ids)).to_dict()
        return self._tower(pooled, self.item_features, self.item_mlp)


def tower_kjt(keys: list[str], ids: dict[str, torch.Tensor]) -> KeyedJaggedTensor:
    """A KJT over all `keys` with one id per row for the keys in `ids` and empty bags for the rest."""
    n = len(next(iter(ids.values())))
    values, lengths = [], []
    for k in keys:
        if k in ids:
            values.append(ids[k].long())
            lengths.append(torch.ones(n, dtype=torch.int32))
        else:
            lengths.append(torch.zeros(n, dtype=torch.int32))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=keys, values=torch.cat(values), lengths=torch.cat(lengths)
    )


def sampled_softmax_loss(
    user: torch.Tensor,
    item: torch.Tensor,
    item_ids: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    item_log_q: torch.Tensor | None,
    neg_item: torch.Tensor | None = None,
    neg_ids: torch.Tensor | None = None,
    neg_log_q: float | None = None,
) -> torch.Tensor:
    """In-batch sampled softmax: row b's positive is item b, the other rows' items are its negatives.

    With `item_log_q` (log sampling probability per item row) the in-batch logits are corrected by
    -log(B·q) — the item's expected count among the B in-batch draws — so popular items, which appear
    as negatives more often, are not over-penalised (Yi et al. 2019). `neg_item` [M, E] (item rows
    `neg_ids`) are extra negatives shared by every row, corrected by `neg_log_q` (uniform draws:
    log(M/N)); the per-source counts matter only when sources are mixed (a constant shift otherwise).
    Duplicates of the positive item elsewhere are masked out of the negatives; rows with label 0
    contribute no positive term (their items still serve as negatives).
    """
    n = len(item_ids)
    logits = user @ item.T / temperature  # [B, B]
    if item_log_q is not None:
        logits = logits - (item_log_q[item_ids] + math.log(n)).unsqueeze(0)
    same = item_ids.unsqueeze(0) == item_ids.unsqueeze(1)
    eye = torch.eye(n, dtype=torch.bool, device=logits.device)
    logits = logits.masked_fill(same & ~eye, float("-inf"))
    if neg_item is not None and neg_ids is not None:
        extra = user @ neg_item.T / temperature  # [B, M]
        if neg_log_q is not None:
            extra = extra - neg_log_q
        extra = extra.masked_fill(neg_ids.unsqueeze(0) == item_ids.unsqueeze(1), float("-inf"))
        logits = torch.cat([logits, extra], dim=1)
    pos = (labels > 0).float()
    target = torch.arange(len(item_ids), device=logits.device)
    per_row = F.cross_entropy(logits, target, reduction="none")
    # A batch without positives gives 0 that still back-propagates (backward's collectives must run).
    return (per_row * pos).sum() / pos.sum().clamp(min=1.0)


# The pipeline FX-traces the task's forward; the loss has data-dependent shapes, so it is a leaf.
torch.fx.wrap("sampled_softmax_loss")


class TwoTowerTask(nn.Module):
    """Train-task wrapper: forward(batch) → (loss, (loss, scores, labels)) for TrainPipelineSparseDist.

    `scores` are the pointwise user·item scores of the batch rows (logits for AUROC).

    Args:
        embedding_l2: λ of λ·mean over rows of the summed squared norms of the pooled embeddings.
        item_rows: [N, F_i] item-feature rows of every item row (row 0 = OOV, never drawn); with
            num_uniform_negatives > 0, M items are drawn uniformly from rows 1..N-1 per training batch.
    """

    def __init__(
        self,
        model: TwoTower,
        item_feature: str,
        loss: str,
        temperature: float,
        item_log_q: torch.Tensor | None,
        device: torch.device | str | None = None,
        embedding_l2: float = 0.0,
        num_uniform_negatives: int = 0,
        item_rows: torch.Tensor | None = None,
        logq_correction: bool = True,
    ) -> None:
        super().__init__()
        if loss not in ("softmax", "bce"):
            raise ValueError(f"model.two_tower.loss: unknown loss {loss!r} (softmax or bce)")
        self.model = model
        self.item_feature = item_feature
        self.loss = loss
        self.temperature = temperature
        self.embedding_l2 = embedding_l2
        self.num_uniform_negatives = num_uniform_negatives if item_rows is not None else 0
        self.logq_correction = logq_correction
        # Plain attributes, not buffers: DDP would broadcast a buffer on every step for nothing.
        self.item_log_q = (
            item_log_q.to(device) if item_log_q is not None and device is not None else item_log_q
        )
        self.item_rows = item_rows.to(device) if item_rows is not None and device is not None else item_rows

    def _uniform_negatives(self) -> tuple[torch.Tensor, torch.Tensor, float | None]:
        """([M, E] embeddings, [M] item rows, log(M/N) or None) of M uniform draws from the catalogue."""
        assert self.item_rows is not None
        n = self.item_rows.shape[0] - 1  # real items: rows 1..N
        m = self.num_uniform_negatives
        ids = torch.randint(1, n + 1, (m,)).to(self.item_rows.device)
        emb = self.model.item_rows_embeddings(self.item_rows[ids])
        return emb, ids, (math.log(m / n) if self.logq_correction else None)

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Loss of one batch and (detached loss, pointwise scores, labels)."""
        # Taken (and copied) before the forward: the sharded EBC's input dist may reuse the KJT's buffers.
        item_ids = batch.sparse_features[self.item_feature].values().clone()
        user, item, sq_norms = self.model.encode(batch.sparse_features)
        labels = batch.labels.float()
        scores = (user * item).sum(-1)
        if self.loss == "softmax":
            neg: tuple[torch.Tensor | None, torch.Tensor | None, float | None] = (None, None, None)
            # Only while training: validation losses stay deterministic and comparable across runs.
            if self.num_uniform_negatives and self.training:
                neg = self._uniform_negatives()
            loss = sampled_softmax_loss(user, item, item_ids, labels, self.temperature, self.item_log_q, *neg)
        else:
            # Cosine scores live in [-1, 1]: the temperature makes them usable logits.
            logits = scores / self.temperature if self.model.normalize else scores
            loss = F.binary_cross_entropy_with_logits(logits, labels)
        if self.embedding_l2 > 0:
            loss = loss + self.embedding_l2 * sq_norms.mean()
        return loss, (loss.detach(), scores.detach(), labels.detach())


def item_log_q(counts: torch.Tensor) -> torch.Tensor:
    """log sampling probability per item row from train counts (unseen rows get the smallest count)."""
    counts = counts.double().clamp(min=1.0)
    return torch.log(counts / counts.sum()).float()

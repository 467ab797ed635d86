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
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys.data.metadata import HISTORY_FEATURE
from recsys.models.sequence import sum_pool, to_padded


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
        ebc: one EmbeddingBagCollection holding the tables of the user and item features (None: all
            in `ec`).
        user_features / item_features: the sparse features pooled by each tower, in order.
        layers: MLP sizes of each tower; the last is the embedding size E ([]: no MLP, E = its input).
        normalize: L2-normalise tower outputs (cosine similarity; used with the softmax loss).
        ec / history: with histories, an EmbeddingCollection holding the item table, shared by the item
            feature and `history` (recsys.models.sequence), and the encoder of the padded history whose
            output joins the user tower's input; `history_length` is L.
        keys: the batch KJT's keys in order (default: the tables' features), for lookups built here.
    """

    def __init__(
        self,
        ebc: EmbeddingBagCollection | None,
        user_features: list[str],
        item_features: list[str],
        layers: list[int],
        normalize: bool,
        dense_device: torch.device | str | None = None,
        ec: EmbeddingCollection | None = None,
        history: nn.Module | None = None,
        history_length: int = 0,
        keys: list[str] | None = None,
    ) -> None:
        super().__init__()
        dims = {
            f: c.embedding_dim for c in (ebc.embedding_bag_configs() if ebc else []) for f in c.feature_names
        }
        for c in ec.embedding_configs() if ec is not None else []:
            dims.update({f: c.embedding_dim for f in c.feature_names if f != HISTORY_FEATURE})
        missing = [f for f in user_features + item_features if f not in dims]
        if missing:
            raise ValueError(f"features {missing} have no embedding table (have {sorted(dims)})")
        self.ebc, self.ec, self.history = ebc, ec, history
        # kept here: DMP's sharded collection does not answer embedding_configs()
        self.ec_features = [f for c in (ec.embedding_configs() if ec else []) for f in c.feature_names]
        self.ec_features = [f for f in self.ec_features if f != HISTORY_FEATURE]
        self.history_length = history_length
        self.user_features = list(user_features)
        self.item_features = list(item_features)
        self.all_features = list(keys) if keys is not None else list(dims)
        self.normalize = normalize
        user_in = sum(dims[f] for f in user_features) + (history.out_dim if history is not None else 0)
        self.user_mlp = mlp(user_in, layers, dense_device)
        self.item_mlp = mlp(sum(dims[f] for f in item_features), layers, dense_device)

    def _tower(self, pooled: dict[str, torch.Tensor], features: list[str], net: nn.Module) -> torch.Tensor:
        out = net(torch.cat([pooled[f] for f in features], dim=1))
        return F.normalize(out, dim=-1) if self.normalize else out

    def _lookup(self, features: KeyedJaggedTensor, users: bool = True) -> dict[str, torch.Tensor]:
        """[B, D] pooled embeddings per feature; with histories and `users`, also the encoded history
        under `history` (item-only lookups skip the encoder)."""
        pooled = self.ebc(features).to_dict() if self.ebc is not None else {}
        if self.ec is None:
            return pooled
        batch = features.stride()
        seq = self.ec(features)
        for f in self.ec_features:
            pooled[f] = sum_pool(seq[f], batch)
        if self.history is not None and users:
            side = [pooled[f] for f in self.user_features]
            x, lengths = to_padded(seq[HISTORY_FEATURE], batch, self.history_length)
            pooled[HISTORY_FEATURE] = self.history(x, lengths, torch.cat(side, 1) if side else None)
        return pooled

    def _user_tower(self, pooled: dict[str, torch.Tensor]) -> torch.Tensor:
        extra = [HISTORY_FEATURE] if self.history is not None else []
        return self._tower(pooled, self.user_features + extra, self.user_mlp)

    def forward(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, E] user and [B, E] item embeddings of the rows of `features`."""
        user, item, _ = self.encode(features)
        return user, item

    def encode(self, features: KeyedJaggedTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, E] user and item embeddings and [B] sum of squared norms of each row's pooled embeddings.

        The norms cover every feature either tower pools (for `embedding_l2`): fbgemm's fused sparse
        optimizers ignore weight decay, so the looked-up rows are penalised through the loss instead.
        """
        pooled = self._lookup(features)
        used = dict.fromkeys(self.user_features + self.item_features)
        sq = torch.stack([pooled[f].pow(2).sum(-1) for f in used]).sum(0)
        return (
            self._user_tower(pooled),
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
        return self._tower(self._lookup(kjt, users=False), self.item_features, self.item_mlp)

    def user_embeddings(
        self, ids: dict[str, torch.Tensor], history: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """[N, E] embeddings of N users given {user feature: [N] embedding rows} and, for a model with
        histories, (history [N, L] item rows left-aligned, lengths [N]) (unsharded model)."""
        return self._user_tower(self._lookup(tower_kjt(self.all_features, ids, history)))

    def item_embeddings(self, ids: dict[str, torch.Tensor]) -> torch.Tensor:
        """[N, E] embeddings of N items given {item feature: [N] embedding rows} (unsharded model)."""
        pooled = self._lookup(tower_kjt(self.all_features, ids), users=False)
        return self._tower(pooled, self.item_features, self.item_mlp)


def tower_kjt(
    keys: list[str], ids: dict[str, torch.Tensor], history: tuple[torch.Tensor, torch.Tensor] | None = None
) -> KeyedJaggedTensor:
    """A KJT over all `keys` with one id per row for the keys in `ids`, the jagged `history` (items
    [N, L] left-aligned, lengths [N]) when given, and empty bags for the rest."""
    n = len(history[1]) if history is not None else len(next(iter(ids.values())))
    values, lengths = [], []
    for k in keys:
        if k in ids:
            values.append(ids[k].long())
            lengths.append(torch.ones(n, dtype=torch.int32))
        elif k == HISTORY_FEATURE and history is not None:
            items, size = history
            valid = torch.arange(items.shape[1]).unsqueeze(0) < size.unsqueeze(1)
            values.append(items[valid].long())
            lengths.append(size.to(torch.int32))
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


def full_softmax_loss(
    user: torch.Tensor,
    all_items: torch.Tensor,
    item_ids: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Softmax over every item row (all_items [N, E]; row 0, the OOV row, is never a class): row b's
    class is item_ids[b]; rows with label 0 or an OOV item contribute nothing."""
    logits = user @ all_items.T / temperature
    logits[:, 0] = float("-inf")
    pos = ((labels > 0) & (item_ids > 0)).float()
    per_row = F.cross_entropy(logits, item_ids.clamp(min=1), reduction="none")
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
        full_softmax: the loss is a softmax over every item row (needs item_rows; small catalogues).
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
        full_softmax: bool = False,
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
        self.full_softmax = full_softmax and item_rows is not None
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
        if self.full_softmax:
            assert self.item_rows is not None
            all_items = self.model.item_rows_embeddings(self.item_rows)
            loss = full_softmax_loss(user, all_items, item_ids, labels, self.temperature)
        elif self.loss == "softmax":
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

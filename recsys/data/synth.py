"""Synthetic raw data with planted structure, written in the same formats real data comes in.

synthetic_ctr: Criteo-layout TSV day files (label, ints, hex categoricals, some fields empty) whose
labels are drawn from a hidden model: logit = bias + per-value effects + dense linear terms +
low-rank pairwise factor interactions between categorical values (what DLRM's dot interaction can
learn). The true click probabilities are saved (true_ctr.npy), and synth.json records the
Bayes-optimal AUC (AUC of the true probabilities against the drawn labels) per day and overall.

Hidden model of `ctr_arrays` (S sparse features of C values each, D dense):
    raw   = 2·Σ_j w_j[v_j]/√S  +  Σ_{i<j ∈ I} ⟨f_i[v_i], f_j[v_j]⟩ / (√P/2)  +  z·β
    logit = -1.2 + 1.6 · signal · standardise(raw),   p = σ(logit),   label ~ Bernoulli(p)
w ~ N(0, 0.35²) per value; f ~ N(0, I/k) rank-k (k = 4) factors per value; z = standardised
log1p(counts); β ~ N(0, 0.25²); missing values contribute nothing. The pairwise (FM) term, which a
linear model cannot express, is ~40% of raw's variance, so logistic regression sits well below the
Bayes AUC (e.g. 0.76–0.80 vs 0.83–0.89) and the DLRM bar tests interaction learning.
I is the set of interacting features: all of them when S ≤ 8, otherwise a seeded subset of 8
(P = |I|(|I|-1)/2 pairs). Spreading a unit-variance FM term over all 325 pairs of 26 features
leaves each pair's dot too weak to learn: a dot-interaction DLRM then stays at logistic
regression's AUC (~0.75 vs Bayes 0.83) even with 900k train rows. With 8 interacting features it
gets within ~0.01 of Bayes from ~300k train rows at C ≤ 50 (measured; see the configs).
Learnability is a data-size threshold: 8 features × 50 values needed ~250k+ train rows (50k rows
gave AUC 0.77 vs Bayes 0.83 for every optimizer setting tried), so the shipped configs size
rows/cardinality for that.

synthetic_interactions: interactions.csv (user_id,item_id,rating,timestamp): each user picks items
without replacement from softmax(u·v/τ + popularity log-prior) with Zipf popularity, at increasing
timestamps. synth.json records what an oracle (the true scores) and popularity achieve on each user's
last interaction (Recall@10), so a learner can be placed between the two.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from recsys.errors import UserError

if TYPE_CHECKING:
    from recsys.config import Config

log = logging.getLogger(__name__)

SYNTH_JSON = "synth.json"
TRUE_CTR = "true_ctr.npy"
MAX_INTERACTING = 8  # sparse features that take part in the hidden pairwise interactions


def raw_dir_of(cfg: Config) -> Path:
    """Where synthetic raw files live: data.raw_dir, default <prepared_dir>/raw."""
    return Path(cfg.data.raw_dir) if cfg.data.raw_dir else Path(cfg.data.prepared_dir) / "raw"


def raw_files(src: Any, raw_dir: str | Path | None) -> list[Path]:
    """The raw files a synthetic source is written to (in read order)."""
    if raw_dir is None:
        raise UserError("synthetic sources need data.raw_dir or data.prepared_dir to locate raw files")
    d = Path(raw_dir)
    if src.kind == "synthetic_ctr":
        return [d / f"day_{i}.tsv" for i in range(src.days)]
    return [d / "interactions.csv"]


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC AUC by ranks (ties averaged); NaN when only one class is present."""
    labels = labels.astype(bool)
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    s = scores[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over runs of equal scores
    boundaries = np.flatnonzero(np.diff(s)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(s)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def synthesize(cfg: Config, overwrite: bool) -> None:
    """Write the configured synthetic source's raw files (+ synth.json) to data.raw_dir."""
    src = cfg.data.source
    if src.kind not in ("synthetic_ctr", "synthetic_interactions"):
        raise UserError(
            f"data.source.kind is {src.kind!r}: `recsys data synth` needs synthetic_ctr or synthetic_interactions"
        )
    out = raw_dir_of(cfg)
    files = [*raw_files(src, out), out / SYNTH_JSON]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise UserError(
            f"{out}: raw files already exist ({existing[0].name}); pass --overwrite to replace them"
        )
    out.mkdir(parents=True, exist_ok=True)
    facts = write_ctr(src, out) if src.kind == "synthetic_ctr" else write_interactions(src, out)
    (out / SYNTH_JSON).write_text(json.dumps(facts, indent=2) + "\n")
    log.info("wrote synthetic %s data to %s", src.kind, out)
    print(f"synth: wrote {src.kind} to {out}: " + json.dumps({k: facts[k] for k in _summary_keys(facts)}))


def _summary_keys(facts: dict[str, Any]) -> list[str]:
    return [
        k
        for k in ("rows", "positive_rate", "bayes_auc", "oracle_recall_at_10", "popularity_recall_at_10")
        if k in facts
    ]


# ---------------------------------------------------------------------------------------------- CTR
def ctr_arrays(src: Any) -> dict[str, Any]:
    """Generate the CTR rows in memory: labels, raw ints (nullable), categorical codes, true p."""
    rng = np.random.default_rng(src.seed)
    n, D, S, C = src.rows, src.num_dense, src.num_sparse, src.cardinality
    k = 4  # rank of the pairwise factor interactions

    # Hidden model parameters.
    zipf = 1.0 / np.arange(1, C + 1) ** 1.05
    value_p = zipf / zipf.sum()
    w = rng.normal(0.0, 0.35, size=(S, C))
    f = rng.normal(0.0, 1.0, size=(S, C, k)) / np.sqrt(k)
    beta = rng.normal(0.0, 0.25, size=D)
    dense_scale = rng.uniform(0.5, 3.0, size=D)
    miss_sparse = np.where(rng.random(S) < 0.35, rng.uniform(0.02, 0.3, size=S), 0.0)
    miss_dense = np.where(rng.random(D) < 0.35, rng.uniform(0.02, 0.2, size=D), 0.0)
    # Each feature's raw ids: distinct 32-bit hashes, printed as 8 hex digits like Criteo's.
    ids = [rng.choice(1 << 32, size=C, replace=False) for _ in range(S)]
    # Drawn only when there is a choice, so data with S ≤ 8 is what it was before the subset existed.
    interacting = np.ones(S, dtype=bool)
    if S > MAX_INTERACTING:
        interacting[:] = False
        interacting[rng.permutation(S)[:MAX_INTERACTING]] = True
    n_int = int(interacting.sum())

    codes = np.empty((n, S), dtype=np.int32)
    for j in range(S):
        # Shuffle which ids are frequent, so popularity is not tied to the code order.
        codes[:, j] = rng.permutation(C)[rng.choice(C, size=n, p=value_p)]
    sparse_missing = rng.random((n, S)) < miss_sparse
    ints = np.floor(rng.lognormal(mean=0.0, sigma=1.0, size=(n, D)) * dense_scale * 3).astype(np.int64)
    if D > 1:
        ints[rng.random(n) < 0.02, 1] = -1  # Criteo's I2 has a few -1s
    dense_missing = rng.random((n, D)) < miss_dense

    # Logit: per-value effects + factor interactions (missing values contribute nothing) + dense.
    present = ~sparse_missing
    effect = np.zeros(n)
    fsum = np.zeros((n, k))
    fsq = np.zeros(n)
    for j in range(S):
        effect += w[j][codes[:, j]] * present[:, j]
        if not interacting[j]:
            continue
        fj = f[j][codes[:, j]] * present[:, j, None]
        fsum += fj
        fsq += (fj * fj).sum(1)
    pairwise = 0.5 * ((fsum * fsum).sum(1) - fsq)
    if n_int > 1:
        pairwise /= np.sqrt(n_int * (n_int - 1) / 2) / 2.0
    z = np.log1p(np.maximum(np.where(dense_missing, 0, ints), 0))
    z = (z - z.mean(0)) / (z.std(0) + 1e-9) if D else z
    lin = z @ beta if D else np.zeros(n)
    raw_logit = effect / np.sqrt(S) * 2.0 + pairwise + lin
    raw_logit = (raw_logit - raw_logit.mean()) / (raw_logit.std() + 1e-9)
    logit = -1.2 + 1.6 * src.signal * raw_logit
    p = 1.0 / (1.0 + np.exp(-logit))
    labels = (rng.random(n) < p).astype(np.int8)
    return {
        "labels": labels,
        "p": p.astype(np.float32),
        "interacting": np.flatnonzero(interacting),
        "ints": ints,
        "dense_missing": dense_missing,
        "codes": codes,
        "sparse_missing": sparse_missing,
        "ids": ids,
    }


def write_ctr(src: Any, out: Path) -> dict[str, Any]:
    """Write day_0.tsv … day_{days-1}.tsv and true_ctr.npy; returns the synth facts."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    a = ctr_arrays(src)
    n, days = src.rows, src.days
    bounds = np.linspace(0, n, days + 1).astype(np.int64)
    dicts = [pa.array([f"{x:08x}" for x in ids], type=pa.string()) for ids in a["ids"]]
    per_day = {}
    for d in range(days):
        lo, hi = int(bounds[d]), int(bounds[d + 1])
        cols: dict[str, pa.Array] = {"label": pa.array(a["labels"][lo:hi])}
        for i in range(src.num_dense):
            cols[f"I{i + 1}"] = pa.array(a["ints"][lo:hi, i], mask=a["dense_missing"][lo:hi, i])
        for j in range(src.num_sparse):
            idx = pa.array(a["codes"][lo:hi, j], mask=a["sparse_missing"][lo:hi, j])
            cols[f"C{j + 1}"] = pa.DictionaryArray.from_arrays(idx, dicts[j]).cast(pa.string())
        pacsv.write_csv(
            pa.table(cols),
            out / f"day_{d}.tsv",
            write_options=pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none"),
        )
        per_day[f"day_{d}"] = auc(a["p"][lo:hi], a["labels"][lo:hi])
    np.save(out / TRUE_CTR, a["p"])
    return {
        "kind": "synthetic_ctr",
        "rows": n,
        "days": days,
        "positive_rate": float(a["labels"].mean()),
        "bayes_auc": auc(a["p"], a["labels"]),
        "bayes_auc_by_day": per_day,
        "mean_true_ctr": float(a["p"].mean()),
        "interacting_features": [f"C{j + 1}" for j in a["interacting"]],
        "true_ctr_file": TRUE_CTR,
    }


# ------------------------------------------------------------------------------------- interactions
def interaction_arrays(src: Any) -> dict[str, Any]:
    """Generate interactions: per user, items drawn without replacement from the planted softmax."""
    rng = np.random.default_rng(src.seed)
    U, n_items, d = src.num_users, src.num_items, src.latent_dim
    # Strong planted signal: unit user and item vectors scored at temperature τ, so the factor term
    # dominates the popularity prior and a learner can clearly beat popularity, while popularity
    # still matters (log-Q correction has something to correct).
    tau = 0.1
    user = rng.normal(size=(U, d))
    user /= np.linalg.norm(user, axis=1, keepdims=True)
    item = rng.normal(size=(n_items, d))
    item /= np.linalg.norm(item, axis=1, keepdims=True)
    pop_rank = rng.permutation(n_items)
    log_prior = -src.popularity_skew * np.log1p(pop_rank)
    scores = user @ item.T / tau + log_prior  # [U, I]

    counts = np.clip(rng.poisson(src.interactions_per_user - 3, size=U) + 3, 3, max(3, n_items // 2))
    users, items, stamps = [], [], []
    t0 = 1_600_000_000
    for u in range(U):
        g = scores[u] - np.log(-np.log(rng.random(n_items)))  # Gumbel top-k = sampling without replacement
        chosen = np.argpartition(-g, counts[u])[: counts[u]]
        chosen = rng.permutation(chosen)
        start = t0 + rng.integers(0, 180 * 86400)
        gaps = rng.integers(60, 3 * 86400, size=counts[u])
        users.append(np.full(counts[u], u))
        items.append(chosen)
        stamps.append(start + np.cumsum(gaps))
    user_col, item_col, ts = np.concatenate(users), np.concatenate(items), np.concatenate(stamps)
    affinity = (user[user_col] * item[item_col]).sum(1)
    rating = np.clip(np.round(3.0 + 2.0 * affinity + rng.normal(0, 0.7, size=len(affinity))), 1, 5)
    order = np.lexsort((user_col, ts))  # rows in time order
    return {
        "user": user_col[order],
        "item": item_col[order],
        "rating": rating[order],
        "timestamp": ts[order],
        "scores": scores,
        "pop_rank": pop_rank,
    }


def _last_item_recall(a: dict[str, Any], num_items: int, k: int = 10) -> tuple[float, float]:
    """Recall@k of the true scores and of train popularity on each user's last interaction."""
    user, item, ts = a["user"], a["item"], a["timestamp"]
    order = np.lexsort((ts, user))
    u_s, i_s = user[order], item[order]
    last = np.r_[u_s[1:] != u_s[:-1], True]
    train_counts = np.bincount(i_s[~last], minlength=num_items)
    pop_order = np.argsort(-train_counts, kind="stable")
    hits_oracle = hits_pop = 0
    starts = np.flatnonzero(np.r_[True, u_s[1:] != u_s[:-1]])
    ends = np.r_[starts[1:], len(u_s)]
    for s, e in zip(starts, ends, strict=True):
        u, seen, target = u_s[s], i_s[s : e - 1], i_s[e - 1]
        sc = a["scores"][u].copy()
        sc[seen] = -np.inf
        hits_oracle += target in np.argpartition(-sc, k)[:k]
        mask = np.ones(num_items, bool)
        mask[seen] = False
        hits_pop += target in pop_order[mask[pop_order]][:k]
    n = len(starts)
    return hits_oracle / n, hits_pop / n


def write_interactions(src: Any, out: Path) -> dict[str, Any]:
    """Write interactions.csv (user_id,item_id,rating,timestamp); returns the synth facts."""
    import pyarrow as pa
    import pyarrow.csv as pacsv

    a = interaction_arrays(src)
    tbl = pa.table(
        {
            "user_id": pa.array(a["user"], pa.int64()),
            "item_id": pa.array(a["item"], pa.int64()),
            "rating": pa.array(a["rating"].astype(np.int64)),
            "timestamp": pa.array(a["timestamp"], pa.int64()),
        }
    )
    pacsv.write_csv(tbl, out / "interactions.csv", write_options=pacsv.WriteOptions(quoting_style="none"))
    oracle, pop = _last_item_recall(a, src.num_items)
    return {
        "kind": "synthetic_interactions",
        "rows": int(len(a["user"])),
        "users": src.num_users,
        "items": src.num_items,
        "oracle_recall_at_10": oracle,
        "popularity_recall_at_10": pop,
        "note": "Recall@10 on each user's last interaction, excluding earlier items",
    }

"""`data.source`: the raw data source kinds, one model each, told apart by `kind`."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from recsys.config.base import Strict


class SyntheticCTRSource(Strict):
    """Criteo-layout click rows whose labels come from a hidden logistic model."""

    kind: Literal["synthetic_ctr"] = Field(description="Source kind selector.")
    rows: int = Field(200_000, gt=0, description="Number of rows to generate.")
    num_dense: int = Field(13, ge=0, description="Integer (count-like) dense features per row.")
    num_sparse: int = Field(26, ge=1, description="Categorical features per row.")
    cardinality: int = Field(1000, gt=1, description="Distinct raw values per categorical feature.")
    days: int = Field(3, ge=1, description="Number of day files (day_0 … day_N-1) to write.")
    signal: float = Field(
        1.0, gt=0, description="Scale of the hidden model's logits (higher = more learnable)."
    )
    seed: int = Field(0, description="Seed of the generator.")


class SyntheticInteractionsSource(Strict):
    """User–item interactions from latent factors with popularity skew and timestamps."""

    kind: Literal["synthetic_interactions"] = Field(description="Source kind selector.")
    num_users: int = Field(2000, gt=0, description="Number of users.")
    num_items: int = Field(1000, gt=0, description="Number of items in the catalogue.")
    interactions_per_user: int = Field(40, gt=1, description="Mean interactions per user.")
    latent_dim: int = Field(8, gt=0, description="Dimension of the planted user/item factors.")
    popularity_skew: float = Field(1.0, ge=0, description="Zipf exponent of item popularity.")
    seed: int = Field(0, description="Seed of the generator.")


class MovieLensSource(Strict):
    """MovieLens ratings in an original layout (ml-100k u.data, ml-1m/10m ratings.dat, ml-latest/25m
    ratings.csv), optionally with user and item side features joined by id."""

    kind: Literal["movielens"] = Field(description="Source kind selector.")
    path: str = Field(
        description="Ratings file: u.data / u1.base, ratings.dat or ratings.csv (format detected from the content)."
    )
    users: str | None = Field(
        None, description="u.user (ml-100k) or users.dat (ml-1m): adds features age, gender, occupation."
    )
    items: str | None = Field(
        None,
        description="u.item (ml-100k), movies.dat (ml-1m/10m) or movies.csv (ml-latest/25m): adds "
        "features genre_0 … genre_{genre_slots-1} and year.",
    )
    genre_slots: int = Field(
        3, ge=1, description="Genre features per item; an item's genres beyond these are dropped (counted)."
    )


class RecBoleSource(Strict):
    """RecBole atomic files: `.inter` plus optional `.user` / `.item` whose fields are joined by id."""

    kind: Literal["recbole"] = Field(description="Source kind selector.")
    inter: str = Field(description="The .inter file (tab-separated, header `field:type`).")
    user: str | None = Field(None, description="The .user file; its fields become user side features.")
    item: str | None = Field(None, description="The .item file; its fields become item side features.")
    user_id_field: str = Field("user_id", description="User id field (in .inter and .user).")
    item_id_field: str = Field("item_id", description="Item id field (in .inter and .item).")
    rating_field: str | None = Field(
        "rating", description="Rating/label field of .inter; null: none (use data.label.mode all_positive)."
    )
    time_field: str | None = Field(
        "timestamp", description="Timestamp field of .inter (leave_last_n order); null: file order."
    )
    user_features: list[str] | None = Field(
        None, description=".user fields used as features; null: every field but the id."
    )
    item_features: list[str] | None = Field(
        None, description=".item fields used as features; null: every field but the id."
    )
    rename: dict[str, str] = Field(
        default_factory=dict, description="Feature names instead of field names, e.g. {class: genre}."
    )
    seq_slots: int = Field(
        3,
        ge=1,
        description="Features per token_seq field (<name>_0 …); tokens beyond them are dropped (counted).",
    )
    seq_separator: str = Field(" ", min_length=1, description="Separator of the tokens of a token_seq field.")
    float_buckets: int = Field(
        10,
        ge=2,
        description="Quantile buckets (over the side file's rows) that turn a float field into tokens.",
    )


class LearningFromSetsSource(Strict):
    """The "Learning from Sets" item_ratings.csv: hashed string user ids, movie ids, ratings."""

    kind: Literal["learning_from_sets"] = Field(description="Source kind selector.")
    path: str = Field(description="Path to item_ratings.csv.")


class CriteoSource(Strict):
    """Criteo TSV files: label, 13 integer and 26 hex categorical fields; empty fields allowed."""

    kind: Literal["criteo"] = Field(description="Source kind selector.")
    paths: list[str] = Field(
        min_length=1, description="TSV files in day order (train.txt, or day_0 … day_N)."
    )


class TableSource(Strict):
    """Generic Parquet or CSV with a column mapping."""

    kind: Literal["table"] = Field(description="Source kind selector.")
    path: str = Field(description="Parquet or CSV file (by extension).")
    label: str | None = Field(None, description="Label column; None makes every row a positive.")
    dense: list[str] = Field(default_factory=list, description="Numeric columns used as dense features.")
    sparse: list[str] = Field(default_factory=list, description="Categorical columns (embedded) in order.")
    timestamp: str | None = Field(None, description="Timestamp column used by temporal splits.")
    user: str | None = Field(None, description="User column for per-user splits and retrieval evaluation.")
    item: str | None = Field(None, description="Item column for retrieval evaluation.")


class PreSplitSource(Strict):
    """Separate train / validation / test files of one inner kind (e.g. ml-100k u1.base / u1.test)."""

    kind: Literal["presplit"] = Field(description="Source kind selector.")
    train: dict[str, Any] = Field(description="Inner source (any non-presplit kind) for the train split.")
    val: dict[str, Any] | None = Field(
        None, description="Inner source for validation; None: carved from train."
    )
    test: dict[str, Any] = Field(description="Inner source for the test split.")


Source = Annotated[
    SyntheticCTRSource
    | SyntheticInteractionsSource
    | MovieLensSource
    | RecBoleSource
    | LearningFromSetsSource
    | CriteoSource
    | TableSource
    | PreSplitSource,
    Field(discriminator="kind"),
]

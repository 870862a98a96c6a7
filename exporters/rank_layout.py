"""Which Feast feature feeds which input of the ranker's feature assembly, and the
ranker's column order: the part of the assembly contract that serving needs without the
assembly itself (no torch). ``exporters/feature_assembly.py`` computes the rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

# Roles some features play, by name. Item profile columns are named as in
# exporters/schema.py ITEMS; the user's reference price is a ``user_activity`` feature.
USER_KEY = "user_id"
ITEM_KEY = "item_id"
CATEGORY = "category"
CREATED_AT = "created_at"
PRICE = "price"
USER_MEAN_PRICE = "user_mean_purchase_price"
# A scalar feature named ``*_at`` holds unix seconds (Feast definitions' convention); the
# assembly turns it into days before the request, so the ranker never sees absolute times.
TIME_SUFFIX = "_at"

CROSS_FEATURES: tuple[str, ...] = (
    "x_tower_score",  # <user_embedding, item_embedding>: the retrieval score
    "x_category_affinity",  # the user's affinity to the item's category (0 if unknown)
    "x_category_affinity_rel",  # the same / the user's largest affinity
    "x_item_age_days",  # request_time - item created_at, in days
    "x_price_vs_user_mean",  # item price / user's mean purchase price (-1 if no purchase)
)
# Value of x_price_vs_user_mean when the user has no mean purchase price to compare with.
NO_PRICE_REFERENCE = -1.0


def is_time_feature(name: str) -> bool:
    """True for scalar features that hold unix seconds (see :data:`TIME_SUFFIX`)."""
    return name.endswith(TIME_SUFFIX)


def _output_name(name: str) -> str:
    return f"{name[: -len(TIME_SUFFIX)]}_days_ago" if is_time_feature(name) else name


@dataclass(frozen=True)
class Layout:
    """Which Feast feature goes into which assembly input, and the fixed sizes.

    ``user_features`` / ``item_features`` are the scalar features in service order (the
    item's ``created_at`` is not among them: it has its own float64 input). ``user_refs`` /
    ``item_refs`` are the ``view:feature`` references to fetch from Feast for each entity.
    ``user_price_feature`` names the user's mean purchase price (None: no such feature; the
    price cross feature is then always ``NO_PRICE_REFERENCE``).
    """

    user_features: tuple[str, ...]
    affinity_feature: str
    n_categories: int
    item_features: tuple[str, ...]
    category_feature: str = CATEGORY
    created_at_feature: str = CREATED_AT
    item_price_feature: str | None = PRICE
    user_price_feature: str | None = USER_MEAN_PRICE
    user_refs: tuple[str, ...] = ()
    item_refs: tuple[str, ...] = ()
    # Per-candidate source features (exporters/candidates.py CANDIDATE_FEATURES), sent to
    # the assembly after the item's Feast features in the same ``item_features`` tensor:
    # both are per-candidate scalars. Empty for releases made before multi-source
    # candidates.
    candidate_features: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Layout:
        d = dict(data)
        for key in (
            "user_features",
            "item_features",
            "user_refs",
            "item_refs",
            "candidate_features",
        ):
            d[key] = tuple(d.get(key, ()))
        return cls(**d)

    @property
    def item_columns(self) -> tuple[str, ...]:
        """Columns of the ``item_features`` tensor: Feast item features, then candidate
        source features."""
        return (*self.item_features, *self.candidate_features)

    @property
    def n_features(self) -> int:
        return len(self.user_features) + len(self.item_columns) + len(CROSS_FEATURES)

    @property
    def names(self) -> list[str]:
        """The ranker's column names (:func:`feature_names` of this layout)."""
        return feature_names(self.user_features, self.item_columns)


def layout_from_service(
    features: Sequence[Any], n_categories: int, candidate_features: Sequence[str] = ()
) -> Layout:
    """Build the layout from a feature service's ordered features, e.g.
    ``exporters.feast_ops.service_features(store, "ranking")`` (objects with ``view``,
    ``name``, ``dtype`` (Feast type name) and ``entity_key``).

    Features of ``user_id`` views are the user inputs (exactly one ``Array(...)``: the
    category affinity); features of ``item_id`` views the item inputs (``category`` and
    ``created_at`` required). Any other feature must be a scalar."""
    user: list[str] = []
    item: list[str] = []
    user_refs: list[str] = []
    item_refs: list[str] = []
    arrays: list[str] = []
    item_names: set[str] = set()
    for f in features:
        ref = f"{f.view}:{f.name}"
        is_array = str(f.dtype).startswith("Array")
        if f.entity_key == USER_KEY:
            user_refs.append(ref)
            (arrays if is_array else user).append(f.name)
        elif f.entity_key == ITEM_KEY:
            if is_array:
                raise ValueError(f"item feature {ref} is an array: not supported")
            item_refs.append(ref)
            item_names.add(f.name)
            if f.name != CREATED_AT:
                item.append(f.name)
        else:
            raise ValueError(f"feature {ref}: join key {f.entity_key!r} is neither user nor item")
    if len(arrays) != 1:
        raise ValueError(f"expected one user category-affinity array feature, found {arrays}")
    missing = [n for n in (CATEGORY, CREATED_AT) if n not in item_names]
    if missing:
        raise ValueError(f"the item features lack {missing}")
    return Layout(
        user_features=tuple(user),
        affinity_feature=arrays[0],
        n_categories=n_categories,
        item_features=tuple(item),
        item_price_feature=PRICE if PRICE in item else None,
        user_price_feature=USER_MEAN_PRICE if USER_MEAN_PRICE in user else None,
        user_refs=tuple(user_refs),
        item_refs=tuple(item_refs),
        candidate_features=tuple(candidate_features),
    )


def feature_names(
    user_feature_names: Sequence[str], item_feature_names: Sequence[str]
) -> list[str]:
    """The ranker's column names in order: user scalars, item scalars, cross features.
    Time features (``*_at``) appear as ``*_days_ago``: that is what their column holds."""
    scalars = [_output_name(n) for n in (*user_feature_names, *item_feature_names)]
    return [*scalars, *CROSS_FEATURES]

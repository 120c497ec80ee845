"""The learned router heads, one module each; importing this package registers them (router/heads/base.py).

A new head is one module here that defines its Head class, options and parameters and calls
`register_head(HeadType(...))`, plus its name in the import below (registration order: a head after
the heads it `needs`). The default kind is `hybrid`.
May import: router.heads.*, router.linear, router.gates, numpy, pydantic.
"""

from router.heads import centroid, classifier, hybrid, knn, token_gates  # noqa: F401  (registration)
from router.heads.base import Features, Head, HeadType, check_head_kind, head_kinds, head_type, head_types

DEFAULT_KIND = "hybrid"

__all__ = [
    "DEFAULT_KIND",
    "Features",
    "Head",
    "HeadType",
    "check_head_kind",
    "head_kinds",
    "head_type",
    "head_types",
]

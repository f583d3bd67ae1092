"""Loss kinds: one module per kind (ce, dft, sed, gem), registered by name on import.

A new kind is one module here (a LossKind subclass under `@register`, imported below) plus its
float64 reference in tests/loss/reference.py; nothing else branches on the kind.
"""

from . import ce, dft, gem, sed  # noqa: F401  (registration order = LOSS_KINDS order)
from .base import KindLoss, LossKind, TokenSums, TokenTerms
from .registry import get_kind, kind_names, register

__all__ = ["KindLoss", "LossKind", "TokenSums", "TokenTerms", "get_kind", "kind_names", "register"]

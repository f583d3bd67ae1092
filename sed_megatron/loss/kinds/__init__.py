"""Loss kinds: one module per kind (ce, dft, sed, gem), registered by name on import.

A kind is one module: a LossKind subclass under `@register` with its hyper-parameters
(`params`: LossConfig fields, flags, YAML keys, their checks), its extra reports (metrics), its
per-token loss and gradient form, and whether it reads tau. The LossConfig, the training
arguments, the start-up checks and the metrics loop over the registry; nothing outside this
folder names a kind. A kind of one's own: a module that registers one, imported with
`--loss-module MODULE` (YAML `loss.module`) before the flags are read. The built-in ones have
their float64 reference in tests/loss/reference.py.
"""

# isort: off
from . import ce, dft, sed, gem  # noqa: F401  (registration order = LOSS_KINDS order)
# isort: on
from .base import KindLoss, LossKind, Param, TokenSums, TokenTerms, finite_number
from .registry import declared_params, get_kind, kind_names, register

__all__ = ["KindLoss", "LossKind", "Param", "TokenSums", "TokenTerms", "declared_params", "finite_number", "get_kind",
           "kind_names", "register"]

"""Configuration of the per-token SFT loss family (CE, DFT, SED, GEM)."""

import math
from dataclasses import dataclass

from .kinds import get_kind, kind_names

IGNORE_INDEX = -100
"""Target id of positions that carry no loss (prompt tokens, padding)."""

LOSS_KINDS = kind_names()
"""The kinds registered by sed_megatron.loss.kinds: ("ce", "dft", "sed", "gem")."""
SED_MASKS = ("topk_mass", "none")
GEM_H = ("linear", "logsigmoid")


@dataclass(frozen=True)
class LossConfig:
    """Which token loss to compute and its hyper-parameters.

    The SED fields (top_k, tau, lam, mask) are read only by kind "sed", except top_k, which
    also sets the top-k mass reported in the stats of every kind; gem_beta and gem_h only by "gem".
    Each kind checks the fields it reads (`LossKind.validate`).
    """

    kind: str = "ce"
    """ce: -log p; dft: -sg(p) log p; sed: -log p + lam * M * (p - 0.5)^2; gem: GEM (h = gem_h)."""
    top_k: int = 2
    """k of the top-k probability mass P_topk that decides the SED mask (paper: 2)."""
    tau: float | None = None
    """SED threshold: the penalty applies where P_topk < tau. Calibrate with tools/calibrate_tau.py."""
    lam: float = 1.0
    """Weight of the SED penalty (paper: 1)."""
    mask: str = "topk_mass"
    """topk_mass: penalty where P_topk < tau; none: penalty on every token."""
    gem_beta: float = 0.7
    """GEM temperature beta of q = softmax(z / beta) (published code: 0.7)."""
    gem_h: str = "linear"
    """GEM's function h: linear (SED-SFT's GEM baseline) or logsigmoid (weights sigmoid(0.01 (z_j - z_y)),
    GEM's own training scripts)."""

    def __post_init__(self):
        if self.kind not in kind_names():
            raise ValueError(f"LossConfig.kind: unknown loss kind {self.kind!r}; expected one of {kind_names()}")
        if self.mask not in SED_MASKS:
            raise ValueError(f"LossConfig.mask: unknown SED mask {self.mask!r}; expected one of {SED_MASKS}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"LossConfig.top_k: must be an integer >= 1, got {self.top_k!r}")
        if not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"LossConfig.lam: must be a finite number >= 0, got {self.lam!r}")
        if self.tau is not None and not (isinstance(self.tau, (int, float)) and 0.0 < self.tau <= 1.0):
            raise ValueError(f"LossConfig.tau: must lie in (0, 1], got {self.tau!r}")
        if not (isinstance(self.gem_beta, (int, float)) and math.isfinite(self.gem_beta) and self.gem_beta > 0):
            raise ValueError(f"LossConfig.gem_beta: must be a finite number > 0, got {self.gem_beta!r}")
        if self.gem_h not in GEM_H:
            raise ValueError(f"LossConfig.gem_h: unknown GEM function {self.gem_h!r}; expected one of {GEM_H}")
        get_kind(self.kind).validate(self)

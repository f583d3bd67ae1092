"""The SFT token loss family: CE, DFT, SED-SFT and GEM, exact under tensor parallelism.

Layers: `kinds/` (one strategy per loss kind, registered by name) and `math.py` are
collective-free; `vocab_parallel.py` holds the autograd Function that owns the collectives and
the public `sft_token_loss`; `fused_linear.py` runs the same steps chunk by chunk of tokens
behind the output layer's GEMM (`fused_linear_sft_loss`; `triton_kernels.py`: its GPU
kernels); `reduce.py` applies the loss mask and the global token count.
"""

from .config import IGNORE_INDEX, LOSS_KINDS, LossConfig
from .fused_linear import fused_linear_sft_loss
from .kinds import LossKind, Param, get_kind, register
from .math import STAT_NAMES
from .reduce import masked_sum_and_count, masked_token_mean
from .vocab_parallel import sft_token_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "STAT_NAMES",
    "LossConfig",
    "LossKind",
    "Param",
    "get_kind",
    "fused_linear_sft_loss",
    "masked_sum_and_count",
    "masked_token_mean",
    "register",
    "sft_token_loss",
]

"""The SFT token loss family: CE, DFT, SED-SFT and GEM, exact under tensor parallelism."""

from .config import IGNORE_INDEX, LOSS_KINDS, SED_MASKS, LossConfig
from .math import STAT_NAMES
from .reduce import masked_sum_and_count, masked_token_mean
from .vocab_parallel import sft_token_loss

__all__ = [
    "IGNORE_INDEX",
    "LOSS_KINDS",
    "SED_MASKS",
    "STAT_NAMES",
    "LossConfig",
    "masked_sum_and_count",
    "masked_token_mean",
    "sft_token_loss",
]

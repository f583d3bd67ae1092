"""sed_megatron: SED-SFT and its baselines on Megatron-Core."""

__version__ = "0.1.0"

"""Checkpoint conversion between Hugging Face and Megatron-Core."""

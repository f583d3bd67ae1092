"""Llama's layers: Megatron's standard GPT decoder block (RMSNorm, SwiGLU, RoPE, GQA; TE or local)."""

from ..gpt import gpt_block_spec


def block_spec(model_cfg, transformer_config, vp_stage=None, pp_rank=None):
    """The decoder layers of one pipeline stage (get_gpt_decoder_block_spec)."""
    return gpt_block_spec(model_cfg, transformer_config, vp_stage, pp_rank)

"""The layers: Megatron's get_gpt_decoder_block_spec per pipeline stage, MoE from the config
alone, and the ModelConfig / TransformerConfig agreement check."""

import pytest

from sed_megatron.models import ModelConfig, family_for
from sed_megatron.models.gpt import check_agrees, decoder_block_spec, gpt_block_spec

from ..distributed import run_distributed

DENSE = ModelConfig(num_layers=4, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                    kv_channels=8, vocab_size=96, padded_vocab_size=128, max_position_embeddings=32)


def test_each_pipeline_stage_gets_its_layers():
    import torch

    config = DENSE.transformer_config(pipeline_model_parallel_size=2, pipeline_dtype=torch.float32)
    for pp_rank in (0, 1):
        spec = gpt_block_spec(DENSE, config, pp_rank=pp_rank)
        assert len(spec.layer_specs) == 2
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    assert spec.layer_norm is WrappedTorchNorm  # torch's RMSNorm for the final norm of local layers


def test_a_family_picks_its_spec_and_flags_alone_the_standard_one(monkeypatch):
    import dataclasses

    from sed_megatron.models import registry

    calls = []
    spying = dataclasses.replace(family_for("llama"), block_spec=lambda *a: calls.append(a) or gpt_block_spec(*a))
    monkeypatch.setitem(registry._FAMILIES, "llama", spying)
    config = DENSE.transformer_config()
    decoder_block_spec(DENSE.replace(model_type="llama"), config, pp_rank=0)
    assert len(calls) == 1
    decoder_block_spec(DENSE, config, pp_rank=0)  # model_type None: Megatron's standard block
    assert len(calls) == 1


def test_config_disagreement_names_the_field():
    with pytest.raises(ValueError, match="ModelConfig.num_query_groups is 2, but the TransformerConfig's "
                                         "num_query_groups is 4"):
        check_agrees(DENSE, DENSE.replace(num_query_groups=4).transformer_config())
    with pytest.raises(ValueError, match="ModelConfig.transformer_impl is 'local'"):
        check_agrees(DENSE, DENSE.transformer_config(transformer_impl="transformer_engine"))


def build_and_check_layers():
    """Dense and MoE models through the same builder: the layer kind follows the TransformerConfig."""
    import torch
    from megatron.core import tensor_parallel
    from megatron.core.transformer.moe.moe_layer import MoELayer

    from sed_megatron.models import build_gpt_model

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    dense = build_gpt_model(DENSE, DENSE.transformer_config())
    assert len(dense.decoder.layers) == 4 and not any(isinstance(l.mlp, MoELayer) for l in dense.decoder.layers)
    assert dense.embedding.word_embeddings.weight.shape == (128, 32)  # padded_vocab_size rows

    moe_cfg = DENSE.replace(num_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2, tied_embeddings=True)
    moe = build_gpt_model(moe_cfg, moe_cfg.transformer_config(moe_router_load_balancing_type="none"))
    assert all(isinstance(layer.mlp, MoELayer) for layer in moe.decoder.layers)
    assert moe.decoder.layers[0].mlp.router.weight.shape == (4, 32)
    tokens = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    causal = torch.triu(torch.ones(16, 16, dtype=torch.bool), diagonal=1).expand(2, 1, 16, 16)
    with torch.no_grad():
        logits = moe.eval()(tokens, torch.arange(16).expand(2, 16), causal)
    assert logits.shape == (2, 16, 128) and torch.isfinite(logits).all()


def test_moe_layers_come_from_the_config_alone():
    run_distributed(build_and_check_layers, world_size=1)

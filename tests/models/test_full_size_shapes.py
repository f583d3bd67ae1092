"""The published configs at full size, on the meta device (no weights): every converted shape."""

import pytest
import torch

from sed_megatron.models import family_for
from sed_megatron.testing.models import hf_to_megatron

from ..distributed import run_distributed

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
CONFIGS = {  # the public config.json values that decide shapes
    "Llama-3.2-3B-Instruct": ("llama", dict(hidden_size=3072, num_hidden_layers=28, num_attention_heads=24,
        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256, head_dim=128, tie_word_embeddings=True,
        max_position_embeddings=131072, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 32.0})),
    "Llama-3.1-8B": ("llama", dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0})),
    "Llama-3.1-70B": ("llama", dict(hidden_size=8192, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, intermediate_size=28672, vocab_size=128256, tie_word_embeddings=False,
        max_position_embeddings=131072, rope_parameters={**LLAMA3_ROPE, "rope_theta": 500000.0, "factor": 8.0})),
    "Qwen2.5-7B": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen2.5-Math-7B-Instruct": ("qwen2", dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, tie_word_embeddings=False,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "Qwen3-8B": ("qwen3", dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=12288, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen3-32B": ("qwen3", dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
        head_dim=128, intermediate_size=25600, vocab_size=151936, tie_word_embeddings=False,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen3-30B-A3B": ("qwen3_moe", dict(hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001, decoder_sparse_step=1,
        mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
    "Qwen3-235B-A22B": ("qwen3_moe", dict(hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, router_aux_loss_coef=0.001, decoder_sparse_step=1,
        mlp_only_layers=[], vocab_size=151936, tie_word_embeddings=False, max_position_embeddings=40960,
        rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6})),
}
# The published sizes (model cards); for MoE models also the parameters a token is routed through.
PARAMS_BILLIONS = {"Llama-3.2-3B-Instruct": 3.21, "Llama-3.1-8B": 8.03, "Llama-3.1-70B": 70.55,
                   "Qwen2.5-7B": 7.62, "Qwen2.5-Math-7B-Instruct": 7.62, "Qwen3-8B": 8.19, "Qwen3-32B": 32.76,
                   "Qwen3-30B-A3B": 30.53, "Qwen3-235B-A22B": 235.09}
ACTIVE_BILLIONS = {"Qwen3-30B-A3B": 3.35, "Qwen3-235B-A22B": 22.19}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_size_shapes(name):
    import transformers

    model_type, values = CONFIGS[name]
    config = transformers.AutoConfig.for_model(model_type, **values)
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(config)
    family = family_for(model_type)
    cfg = family.config_from_hf(config)
    padded = -(-config.vocab_size // 1024) * 1024
    assert cfg.padded_vocab_size == padded
    hf_state = hf.state_dict()  # MoE experts stacked, as transformers holds them
    state = dict(hf_to_megatron(hf_state.__getitem__, cfg, family.rows(cfg, stored=hf_state)))
    h, d = config.hidden_size, cfg.kv_channels
    heads, groups, ffn = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    experts = getattr(config, "num_experts", None) if model_type == "qwen3_moe" else None
    expected = {"embedding.word_embeddings.weight": (padded, h), "decoder.final_layernorm.weight": (h,)}
    if not config.tie_word_embeddings:
        expected["output_layer.weight"] = (padded, h)
    for i in range(config.num_hidden_layers):
        prefix = f"decoder.layers.{i}."
        expected[prefix + "self_attention.linear_qkv.weight"] = ((heads + 2 * groups) * d, h)
        expected[prefix + "self_attention.linear_proj.weight"] = (h, heads * d)
        expected[prefix + "input_layernorm.weight"] = (h,)
        expected[prefix + "pre_mlp_layernorm.weight"] = (h,)
        if experts:
            expected[prefix + "mlp.router.weight"] = (experts, h)
            for e in range(experts):
                expected[prefix + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] = (2 * config.moe_intermediate_size, h)
                expected[prefix + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] = (h, config.moe_intermediate_size)
        else:
            expected[prefix + "mlp.linear_fc1.weight"] = (2 * ffn, h)
            expected[prefix + "mlp.linear_fc2.weight"] = (h, ffn)
        if model_type == "qwen2":
            expected[prefix + "self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * d,)
        if model_type.startswith("qwen3"):  # QK-norm: one weight of head_dim each
            expected[prefix + "self_attention.q_layernorm.weight"] = (d,)
            expected[prefix + "self_attention.k_layernorm.weight"] = (d,)
    assert {k: tuple(v.shape) for k, v in state.items()} == expected
    # Parameter count of the Hugging Face model (the published size), padding rows aside.
    count = sum(v.numel() for v in state.values()) - (padded - config.vocab_size) * h * (1 + (not config.tie_word_embeddings))
    assert count == sum(p.numel() for p in hf.parameters())
    assert count / 1e9 == pytest.approx(PARAMS_BILLIONS[name], abs=0.01)
    if experts:  # what a token goes through: every tensor but the experts it is not routed to
        idle = (experts - cfg.moe_router_topk) * 3 * h * cfg.moe_ffn_hidden_size * config.num_hidden_layers
        assert (count - idle) / 1e9 == pytest.approx(ACTIVE_BILLIONS[name], abs=0.01)
        assert cfg.moe_router_pre_softmax is False and cfg.moe_aux_loss_coeff == 0.001  # norm_topk_prob, 1e-3
    assert cfg.kv_channels == values.get("head_dim", h // heads)
    if "rope_parameters" in values and values["rope_parameters"]["rope_type"] == "llama3":
        assert cfg.rope_scaling_factor == values["rope_parameters"]["factor"]


def _megatron_shapes_match(names):
    """On one rank (TP = PP = 1): each full-size GPTModel built on the meta device from its
    ModelConfig has exactly the shapes the converted tensors have."""
    import transformers

    from sed_megatron.models import build_gpt_model

    for name in names:
        model_type, values = CONFIGS[name]
        config = transformers.AutoConfig.for_model(model_type, **values)
        family = family_for(model_type)
        cfg = family.config_from_hf(config)
        with torch.device("meta"):
            hf = transformers.AutoModelForCausalLM.from_config(config)
            model = build_gpt_model(cfg, cfg.transformer_config(perform_initialization=False))
        state = hf.state_dict()
        converted = {k: tuple(v.shape) for k, v in hf_to_megatron(state.__getitem__, cfg,
                                                                  family.rows(cfg, stored=state))}
        built = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
        assert converted == built, name


def test_full_size_megatron_models_have_the_converted_shapes():
    run_distributed(_megatron_shapes_match, world_size=1, args=(list(CONFIGS),))

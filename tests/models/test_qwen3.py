"""Qwen3 and Qwen3-MoE specifics: what each family overrides, the expert name maps of both layer
implementations, norm_topk_prob both ways, the variants that are refused with the field named,
and the routers' load-balancing loss in the objective as Megatron adds it."""

import pytest
import torch

from sed_megatron.models import family_for
from sed_megatron.testing.models import hf_to_megatron
from sed_megatron.testing.tiny_hf import hub_state_dict, tiny_hf_config, tiny_hf_model

from ..distributed import run_distributed


def test_qwen3_is_llama_plus_qk_norm():
    qwen3, llama, moe = family_for("qwen3"), family_for("llama"), family_for("qwen3_moe")
    assert qwen3.block_spec is llama.block_spec and qwen3.mappings is not llama.mappings
    cfg = qwen3.config_from_hf(tiny_hf_config("qwen3_tied"))
    assert cfg.qk_layernorm and not cfg.qkv_bias and cfg.kv_channels == 20 != cfg.hidden_size // 4
    assert cfg.rotary_base == 1000000 and cfg.tied_embeddings and cfg.norm_epsilon == 1e-6
    ours, theirs = ({row.megatron: row.hf for row in f.rows(cfg)}.items() for f in (qwen3, llama))
    extra = ours - theirs
    assert sorted(extra) == [(f"decoder.layers.{i}.self_attention.{q}_layernorm.weight",
                              (f"model.layers.{i}.self_attn.{q}_norm.weight",)) for i in (0, 1) for q in "kq"]
    assert moe.block_spec is not llama.block_spec  # its local MoE norm is keyed as TE keys it


@pytest.mark.parametrize("impl,grouped,fc1", [
    ("local", False, "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"),
    ("transformer_engine", False, "decoder.layers.1.mlp.experts.local_experts.5.linear_fc1.weight"),
    ("transformer_engine", True, "decoder.layers.1.mlp.experts.linear_fc1.weight5"),
])
def test_expert_names_of_both_layer_implementations(impl, grouped, fc1):
    model = tiny_hf_model("qwen3_moe")
    family = family_for("qwen3_moe")
    cfg = family.config_from_hf(model.config).replace(transformer_impl=impl, moe_grouped_gemm=grouped)
    rows = {row.megatron: row.hf for row in family.rows(cfg)}
    assert rows[fc1] == ("model.layers.1.mlp.experts.5.gate_proj.weight", "model.layers.1.mlp.experts.5.up_proj.weight")
    assert rows[fc1.replace("fc1", "fc2")] == ("model.layers.1.mlp.experts.5.down_proj.weight",)
    assert rows["decoder.layers.1.mlp.router.weight"] == ("model.layers.1.mlp.gate.weight",)
    # The MoE layer's norm is a module of its own with either implementation.
    assert rows["decoder.layers.1.pre_mlp_layernorm.weight"] == ("model.layers.1.post_attention_layernorm.weight",)
    # Every tensor save_pretrained writes has its row (export writes the Hub's per-expert names) ...
    assert {n for names in rows.values() for n in names} == set(hub_state_dict(model))
    # ... and transformers' stacked experts are read as slices of one tensor per layer.
    stacked = {row.megatron: row.hf for row in family.rows(cfg, stored=model.state_dict())}
    assert stacked[fc1] == ("model.layers.1.mlp.experts.gate_up_proj",) and len(stacked) == len(rows)


def test_norm_topk_prob_and_the_aux_loss_weight_both_ways():
    family = family_for("qwen3_moe")
    for variant, pre_softmax, topk in (("qwen3_moe", False, 2), ("qwen3_moe_unnormalized", True, 3)):
        config = tiny_hf_config(variant)
        cfg = family.config_from_hf(config)
        # Megatron without pre-softmax: the softmax over the k selected logits = top-k probabilities renormalized.
        assert (cfg.moe_router_pre_softmax, cfg.moe_router_topk, cfg.num_experts) == (pre_softmax, topk, 6)
        assert (cfg.moe_ffn_hidden_size, cfg.moe_aux_loss_coeff) == (40, 0.01)
        flags = cfg.to_megatron_flags()
        assert flags["moe_router_pre_softmax"] is pre_softmax and flags["moe_aux_loss_coeff"] == 0.01
        assert flags["moe_router_load_balancing_type"] == "aux_loss"
        back = family.hf_config(cfg)
        assert (back.norm_topk_prob, back.num_experts_per_tok, back.router_aux_loss_coef) == (not pre_softmax, topk, 0.01)
        assert (back.decoder_sparse_step, back.mlp_only_layers, back.head_dim) == (1, [], 20)
    cfg = family.config_from_hf(tiny_hf_config("qwen3_moe"))
    with pytest.raises(ValueError, match="ModelConfig.num_experts=None: a qwen3_moe model needs experts"):
        family.hf_config(cfg.replace(num_experts=None))
    with pytest.raises(ValueError, match="ModelConfig.qkv_bias=True: a qwen3_moe model needs False"):
        family.hf_config(cfg.replace(qkv_bias=True))
    with pytest.raises(ValueError, match="ModelConfig.qk_layernorm=False: a qwen3 model needs True"):
        family_for("qwen3").hf_config(cfg.replace(num_experts=None, qk_layernorm=False))


@pytest.mark.parametrize("variant,change,message", [
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, "^shared_expert_intermediate_size=64: shared experts are "
                                                           "not supported"),
    ("qwen3_moe", {"decoder_sparse_step": 2}, "^decoder_sparse_step=2 is not supported: every layer must be an MoE"),
    ("qwen3_moe", {"mlp_only_layers": [1]}, "^mlp_only_layers=\\[1\\] is not supported"),
    ("qwen3_moe", {"num_experts_per_tok": 1}, "^norm_topk_prob=true with num_experts_per_tok=1 is not supported"),
    ("qwen3_moe", {"num_experts": 0}, "^num_experts=0: a qwen3_moe model needs experts"),
    ("qwen3_moe", {"use_sliding_window": True}, "^use_sliding_window=true is not supported"),
    ("qwen3_tied", {"use_sliding_window": True}, "^use_sliding_window=true is not supported"),
    ("qwen3_tied", {"attention_bias": True}, "^attention_bias=True is not supported"),
])
def test_variants_this_does_not_cover_name_the_field(variant, change, message):
    config = tiny_hf_config(variant)
    for key, value in change.items():
        setattr(config, key, value)
    with pytest.raises(ValueError, match=message):
        family_for(config.model_type).config_from_hf(config)


def test_top1_routing_without_renormalization_converts():
    config = tiny_hf_config("qwen3_moe_unnormalized")
    config.num_experts_per_tok = 1
    cfg = family_for("qwen3_moe").config_from_hf(config)
    assert (cfg.moe_router_topk, cfg.moe_router_pre_softmax) == (1, True)  # the probability over all experts


def check_aux_loss_gradient():
    """The last layer's router gets, beside the task loss's gradient, coeff x the gradient of
    Megatron's switch load-balancing loss E * sum_i f_i P_i of that layer (f_i: share of the T x k
    routed slots that go to expert i, P_i: mean probability of expert i): exactly that, in fp32."""
    from megatron.core import tensor_parallel

    from sed_megatron.models import build_gpt_model

    hf_model = tiny_hf_model("qwen3_moe")
    family = family_for("qwen3_moe")
    cfg = family.config_from_hf(hf_model.config).replace(padded_vocab_size=120)
    hf_state = hf_model.state_dict()
    state = dict(hf_to_megatron(hf_state.__getitem__, cfg, family.rows(cfg, stored=hf_state)))
    b, s = 2, 24
    tokens = torch.randint(0, cfg.vocab_size, (b, s), generator=torch.Generator().manual_seed(1))
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    grads, inputs = {}, {}
    for coeff in (0.0, cfg.moe_aux_loss_coeff):
        tensor_parallel.model_parallel_cuda_manual_seed(0)
        model = build_gpt_model(cfg, cfg.transformer_config(moe_aux_loss_coeff=coeff))
        model.load_state_dict(state, strict=False)
        router = model.decoder.layers[-1].mlp.router
        hook = router.register_forward_pre_hook(lambda module, args: inputs.update(x=args[0].detach().clone()))
        logits = model.train()(tokens, torch.arange(s).expand(b, s), causal)  # (b, s, V)
        torch.logsumexp(logits, dim=-1).sum().backward()  # any task loss
        hook.remove()
        grads[coeff] = router.weight.grad.clone()
    x = inputs["x"].reshape(-1, cfg.hidden_size)  # (T, h)
    weight = state["decoder.layers.1.mlp.router.weight"].clone().requires_grad_()
    probs = torch.softmax(x @ weight.T, dim=-1)  # (T, E)
    routed = torch.zeros_like(probs).scatter(1, probs.topk(cfg.moe_router_topk, dim=-1).indices, 1.0)
    T, k, E = x.shape[0], cfg.moe_router_topk, cfg.num_experts
    aux = E * ((routed.sum(0) / (T * k)) * probs.mean(0)).sum()
    aux.backward()
    assert not torch.equal(grads[0.0], grads[cfg.moe_aux_loss_coeff])
    # fp32, the same operations in another order: ~1e-8 on gradients of ~1e-3.
    torch.testing.assert_close(grads[cfg.moe_aux_loss_coeff] - grads[0.0], cfg.moe_aux_loss_coeff * weight.grad,
                               atol=1e-6, rtol=1e-4)


def test_the_load_balancing_loss_is_in_the_objective():
    run_distributed(check_aux_loss_gradient, world_size=1)

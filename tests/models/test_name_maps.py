"""Every family's name map on tiny random models of every variant (GQA and MHA, tied and untied,
QKV biases, RoPE scaling, QK-norm, MoE experts per expert and stacked): exact round trips both
ways, HF config round trips, and Megatron logits equal to transformers."""

import pytest
import torch

from sed_megatron.models import family_for
from sed_megatron.models.mapping import megatron_to_hf
from sed_megatron.testing.models import hf_to_megatron
from sed_megatron.testing.tiny_hf import (
    TINY_VARIANTS,
    hub_state_dict,
    tiny_hf_config,
    tiny_hf_model,
)

from ..distributed import run_distributed

VARIANTS = list(TINY_VARIANTS)
IMPLS = ["local", "transformer_engine"]  # names only: both layer implementations' state dicts


def converted(variant, transformer_impl="local", padded_vocab_size=128):
    model = tiny_hf_model(variant)
    family = family_for(model.config.model_type)
    cfg = family.config_from_hf(model.config).replace(padded_vocab_size=padded_vocab_size,
                                                      transformer_impl=transformer_impl)
    return model, family, cfg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_megatron_hf_is_bit_identical(variant, impl):
    model, family, cfg = converted(variant, impl)
    hf = hub_state_dict(model)  # the tensors save_pretrained writes (one per MoE expert)
    rows = family.rows(cfg)
    mcore = dict(hf_to_megatron(hf.__getitem__, cfg, family.rows(cfg, stored=hf)))
    assert mcore["embedding.word_embeddings.weight"].shape[0] == 128
    assert ("output_layer.weight" in mcore) != cfg.tied_embeddings
    in_memory = model.state_dict()  # MoE experts stacked: the same Megatron tensors
    stacked = dict(hf_to_megatron(in_memory.__getitem__, cfg, family.rows(cfg, stored=in_memory)))
    assert stacked.keys() == mcore.keys() and all(torch.equal(stacked[n], mcore[n]) for n in mcore)
    back = dict(megatron_to_hf(mcore.__getitem__, cfg, rows))
    expected = {k: v for k, v in hf.items() if not (cfg.tied_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_hf_megatron_is_bit_identical(variant):
    """The export direction on its own: arbitrary Megatron tensors (zero padding rows) survive
    the split into Hugging Face tensors and the fusion back, whatever the grouping."""
    _, family, cfg = converted(variant)
    gen = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        meta = tiny_hf_model_meta(variant)
        shapes = dict(hf_to_megatron(meta.__getitem__, cfg, family.rows(cfg, stored=meta)))
    mcore = {name: torch.randn(t.shape, generator=gen) for name, t in shapes.items()}
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        if name in mcore:
            mcore[name][cfg.vocab_size:] = 0  # the padding rows the export drops
    hf = dict(megatron_to_hf(mcore.__getitem__, cfg, family.rows(cfg)))
    again = dict(hf_to_megatron(hf.__getitem__, cfg, family.rows(cfg)))
    assert again.keys() == mcore.keys()
    assert all(torch.equal(again[name], mcore[name]) for name in mcore)


def tiny_hf_model_meta(variant):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(tiny_hf_config(variant)).state_dict()


@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_config_round_trip(variant):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config = tiny_hf_config(variant)
    family = family_for(config.model_type)
    cfg = family.config_from_hf(config)
    again = family.hf_config(cfg)
    assert type(again) is type(config) and again.model_type == config.model_type
    assert family.config_from_hf(again) == cfg
    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type] == family.architecture


def check_logits_match(variant):
    from megatron.core import tensor_parallel

    from sed_megatron.models import build_gpt_model

    hf_model, family, cfg = converted(variant, padded_vocab_size=tiny_hf_config(variant).vocab_size)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    model = build_gpt_model(cfg, cfg.transformer_config())
    hf_state = hf_model.state_dict()
    state = dict(hf_to_megatron(hf_state.__getitem__, cfg, family.rows(cfg, stored=hf_state)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
    tokens = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        causal = torch.triu(torch.ones(24, 24, dtype=torch.bool), diagonal=1).expand(2, 1, 24, 24)
        got = model.eval()(tokens, torch.arange(24).expand(2, 24), causal)
    # fp32 on both sides; attention and RoPE evaluated in another order: ~1e-6.
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4, msg=variant)


def check_all_logits_match(variants):
    for variant in variants:
        check_logits_match(variant)


def test_megatron_logits_equal_transformers():
    run_distributed(check_all_logits_match, world_size=1, args=(VARIANTS,))  # one process for every variant

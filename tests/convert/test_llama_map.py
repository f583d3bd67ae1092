"""Llama-family name map and transforms: exact round trips, logits equal to transformers, full-size shapes."""

import pytest
import torch

from sed_megatron.convert.llama import (
    Layout, fuse_qkv, hf_config_from_flags, hf_to_megatron, megatron_flags_from_hf, megatron_to_hf, split_qkv,
)
from sed_megatron.testing.distributed import run_distributed
from sed_megatron.testing.tiny_hf import TINY_VARIANTS, tiny_hf_config, tiny_hf_model

VARIANTS = list(TINY_VARIANTS)


def test_qkv_is_grouped_not_concatenated():
    heads, groups, d = 4, 2, 3
    q = torch.arange(heads * d).float().view(-1, 1)
    k = 100 + torch.arange(groups * d).float().view(-1, 1)
    v = 200 + torch.arange(groups * d).float().view(-1, 1)
    fused = fuse_qkv(q, k, v, groups).flatten().tolist()
    # group 0: q heads 0-1, k0, v0; group 1: q heads 2-3, k1, v1
    assert fused == [0, 1, 2, 3, 4, 5, 100, 101, 102, 200, 201, 202, 6, 7, 8, 9, 10, 11, 103, 104, 105, 203, 204, 205]
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(torch.tensor(fused).view(-1, 1), groups, heads, d), (q, k, v)))


@pytest.mark.parametrize("te_names", [False, True])
@pytest.mark.parametrize("variant", VARIANTS)
def test_hf_megatron_hf_is_bit_identical(variant, te_names):
    model = tiny_hf_model(variant)
    flags = megatron_flags_from_hf(model.config)
    layout = Layout.from_flags(flags, padded_vocab_size=128, te_names=te_names)
    hf = model.state_dict()
    mcore = dict(hf_to_megatron(hf.__getitem__, layout))
    assert mcore["embedding.word_embeddings.weight"].shape[0] == 128
    assert ("output_layer.weight" in mcore) != model.config.tie_word_embeddings
    back = dict(megatron_to_hf(mcore.__getitem__, layout))
    expected = {k: v for k, v in hf.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(back[name], tensor), name


@pytest.mark.parametrize("variant", VARIANTS)
def test_config_round_trip(variant):
    config = tiny_hf_config(variant)
    flags = megatron_flags_from_hf(config)
    again = hf_config_from_flags(flags, config.model_type)
    assert megatron_flags_from_hf(again) == flags


def test_unsupported_model_type_lists_the_supported():
    import transformers

    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'; supported: llama, mistral, qwen2"):
        megatron_flags_from_hf(transformers.GPT2Config())


def megatron_model_from_flags(flags):
    """A TP=1 GPTModel built the way training builds it: Megatron's parser, config and our provider."""
    import argparse

    from megatron.training.argument_utils import core_transformer_config_from_args
    from megatron.training.arguments import add_megatron_arguments, validate_args

    from sed_megatron.models.gpt import build_gpt_model
    from sed_megatron.training.arguments import yaml_flags_to_argv

    parser = add_megatron_arguments(argparse.ArgumentParser(allow_abbrev=False))
    argv = yaml_flags_to_argv(flags, parser, "converted flags") + [
        "--seq-length", "32", "--micro-batch-size", "1", "--transformer-impl", "local", "--use-cpu-initialization",
        "--no-persist-layer-norm", "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
        "--no-bias-swiglu-fusion", "--no-rope-fusion", "--tokenizer-type", "NullTokenizer"]
    args = parser.parse_args(argv)
    args.rank, args.world_size = 0, 1
    validate_args(args, {})
    args.padded_vocab_size = flags["vocab_size"]
    from megatron.core import tensor_parallel

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    return build_gpt_model(args, core_transformer_config_from_args(args))


def check_logits_match(variant):
    hf_model = tiny_hf_model(variant)
    flags = megatron_flags_from_hf(hf_model.config)
    model = megatron_model_from_flags(flags)
    layout = Layout.from_flags(flags)
    state = dict(hf_to_megatron(hf_model.state_dict().__getitem__, layout))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
    tokens = torch.randint(0, flags["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf_model(tokens).logits
        causal = torch.triu(torch.ones(24, 24, dtype=torch.bool), diagonal=1).expand(2, 1, 24, 24)
        got = model.eval()(tokens, torch.arange(24).expand(2, 24), causal)
    # fp32 on both sides; attention and RoPE evaluated in another order: ~1e-6.
    torch.testing.assert_close(got, expected, atol=5e-5, rtol=1e-4, msg=variant)


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_logits_equal_transformers(variant):
    run_distributed(check_logits_match, world_size=1, args=(variant,))

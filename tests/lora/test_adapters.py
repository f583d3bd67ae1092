"""LoRA adapters on Megatron's layers against independent references, in the kept processes:

- transformers + PEFT with the same adapter loaded (the PEFT file format as exported), for
  Llama, Qwen2 (QKV bias), Qwen3 (head_dim != hidden / heads) and Qwen3-MoE's attention;
- the base model with the adapters merged into its weights (what the merged export writes);
- the same model at TP=1 for TP=2 with and without sequence parallelism: loss and every
  adapter's gradient;
- with B = 0 (PEFT's initialization) the logits are the base's, bit for bit.
"""

import json
import os
import zlib

import pytest
import torch

from sed_megatron.lora import LoRAConfig, apply_lora
from sed_megatron.lora.layers import LinearAdapters
from sed_megatron.lora.peft import ADAPTER_WEIGHTS, adapted_targets, adapter_config, merge_layer, peft_tensors

from ..distributed import run_distributed

RANK, ALPHA = 4, 8.0


def randomize_adapters(model, seed=0):
    """Every adapter's A and B set from seeded whole (TP=1) matrices, this rank's slice of them:
    the same adapters whatever the layout."""
    for name, module in model.named_modules():
        if not isinstance(module, LinearAdapters):
            continue
        rank = torch.distributed.get_rank(module.tp_group) if module.tp_group is not None else 0
        size = torch.distributed.get_world_size(module.tp_group) if module.tp_group is not None else 1
        for target in module.targets:
            low = getattr(module, target)
            generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{name}/{target}".encode()))
            a_cols = low.lora_A.shape[1] * (size if module.parallel == "row" else 1)
            b_rows = low.lora_B.shape[0] * (size if module.parallel == "column" else 1)
            a = torch.randn(RANK, a_cols, generator=generator) * a_cols ** -0.5
            b = torch.randn(b_rows, RANK, generator=generator) * 0.2
            with torch.no_grad():
                low.lora_A.copy_(a.chunk(size, 1)[rank] if module.parallel == "row" else a)
                low.lora_B.copy_(b.chunk(size, 0)[rank] if module.parallel == "column" else b)


def _hf_and_megatron(variant):
    from megatron.core import tensor_parallel

    from sed_megatron.models import build_gpt_model, family_for
    from sed_megatron.testing.models import hf_to_megatron
    from sed_megatron.testing.tiny_hf import tiny_hf_model

    tensor_parallel.model_parallel_cuda_manual_seed(0)
    hf = tiny_hf_model(variant)
    family = family_for(hf.config.model_type)
    cfg = family.config_from_hf(hf.config)
    hf_state = hf.state_dict()
    state = dict(hf_to_megatron(hf_state.__getitem__, cfg, family.rows(cfg, stored=hf_state)))
    model = build_gpt_model(cfg, cfg.transformer_config())
    model.load_state_dict(state, strict=False)
    return hf, cfg, state, model.eval()


def _logits(model, tokens):
    b, s = tokens.shape
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    with torch.no_grad():
        return model(tokens, torch.arange(s).expand(b, s), causal)


def check_against_peft_and_merged(variant, out_dir):
    import peft
    from safetensors.torch import save_file

    from sed_megatron.models import build_gpt_model

    hf, cfg, state, model = _hf_and_megatron(variant)
    tokens = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    base_logits = _logits(model, tokens)
    lora = LoRAConfig(rank=RANK, alpha=ALPHA, target_modules="all-linear")
    apply_lora(model, lora)
    assert torch.equal(_logits(model, tokens), base_logits)  # B = 0: the base, bit for bit
    randomize_adapters(model)
    ours = _logits(model, tokens)[..., :cfg.vocab_size]
    assert (ours - base_logits[..., :cfg.vocab_size]).abs().max() > 1e-2  # the adapters change the logits

    adapters = {n: p.detach() for n, p in model.state_dict().items() if "_lora." in n}
    targets = adapted_targets(adapters)
    assert targets == (("q_proj", "k_proj", "v_proj", "o_proj") if cfg.num_experts else lora.target_modules)
    os.makedirs(out_dir, exist_ok=True)
    save_file(dict(peft_tensors(adapters)), os.path.join(out_dir, ADAPTER_WEIGHTS))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter_config(lora, targets, "tiny"), f)
    with _no_warnings():
        theirs = peft.PeftModel.from_pretrained(hf, out_dir).eval()
    with torch.no_grad():
        reference = theirs(tokens).logits
    # fp32 on both sides, other kernels and summation orders: ~1e-6.
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=1e-4)

    merged_state = merge_layer({**state, **adapters}, cfg, lora)
    assert not any("_lora." in n for n in merged_state)
    merged = build_gpt_model(cfg, cfg.transformer_config())
    merged.load_state_dict(merged_state, strict=False)
    torch.testing.assert_close(_logits(merged.eval(), tokens)[..., :cfg.vocab_size], ours, atol=2e-5, rtol=1e-4)


class _no_warnings:
    """PEFT warns about missing or unexpected adapter keys: there must be none."""

    def __enter__(self):
        import warnings

        self._catch = warnings.catch_warnings(record=True)
        self.records = self._catch.__enter__()
        warnings.simplefilter("always")

    def __exit__(self, *exc):
        self._catch.__exit__(*exc)
        messages = [str(r.message) for r in self.records if "adapter" in str(r.message).lower()
                    or "missing" in str(r.message).lower() or "unexpected" in str(r.message).lower()]
        assert not messages, messages


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_bias", "qwen3_tied", "qwen3_moe"])
def test_logits_equal_transformers_with_peft_and_the_merged_model(variant, tmp_path):
    run_distributed(check_against_peft_and_merged, world_size=1, args=(variant, str(tmp_path)))


def lora_loss_and_grads(tp, sequence_parallel):
    """The SED loss of a tiny model with random adapters and the whole (TP=1) gradient of every adapter."""
    from megatron.core import tensor_parallel

    from sed_megatron.loss import LossConfig, masked_sum_and_count, sft_token_loss
    from sed_megatron.models import build_gpt_model
    from sed_megatron.testing.models import tiny_model_config

    model_cfg = tiny_model_config(vocab_size=64)
    torch.manual_seed(7)
    tensor_parallel.model_parallel_cuda_manual_seed(7)
    model = build_gpt_model(model_cfg, model_cfg.transformer_config(tensor_model_parallel_size=tp,
                                                                     sequence_parallel=sequence_parallel))
    apply_lora(model, LoRAConfig(rank=RANK, alpha=ALPHA))
    randomize_adapters(model)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "_lora." in n}
    b, s = 2, 16
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 64, (b, s + 1), generator=generator)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1).expand(b, 1, s, s)
    logits = model(tokens[:, :-1], torch.arange(s).expand(b, s), causal)
    cfg = LossConfig(kind="sed", top_k=2, tau=0.05, lam=1.0)
    token_loss, _ = sft_token_loss(logits, tokens[:, 1:], cfg, tp_group=model.pg_collection.tp if tp > 1 else None)
    total, count = masked_sum_and_count(token_loss, torch.ones_like(token_loss))
    (total / count).backward()
    if sequence_parallel:  # what Megatron's finalize_model_grads does for `sequence_parallel` parameters
        for p in model.parameters():
            if p.requires_grad and getattr(p, "sequence_parallel", False):
                torch.distributed.all_reduce(p.grad, group=model.pg_collection.tp)
    grads = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearAdapters):
            for target in module.targets:
                for which in "AB":
                    grad = getattr(getattr(module, target), f"lora_{which}").grad
                    dim = {"column": {"B": 0}, "row": {"A": 1}}[module.parallel].get(which)
                    if dim is not None and tp > 1:
                        parts = [torch.empty_like(grad) for _ in range(tp)]
                        torch.distributed.all_gather(parts, grad.contiguous(), group=model.pg_collection.tp)
                        grad = torch.cat(parts, dim)
                    grads[f"{name}.{target}.lora_{which}"] = grad
    return float(total / count), grads


def check_tp_matches(tp, sequence_parallel, expected):
    loss, grads = lora_loss_and_grads(tp, sequence_parallel)
    want_loss, want = expected
    assert loss == pytest.approx(want_loss, rel=1e-6)
    assert grads.keys() == want.keys()
    assert all(float(g.abs().max()) > 0 for g in want.values())  # every adapter takes part
    for name in want:  # fp32, another reduction order: ~1e-7 relative
        torch.testing.assert_close(grads[name], want[name], atol=1e-7, rtol=1e-5, msg=name)


@pytest.mark.parametrize("sequence_parallel", [False, True])
def test_tp2_matches_tp1(sequence_parallel):
    expected = run_distributed(lora_loss_and_grads, world_size=1, args=(1, False))
    run_distributed(check_tp_matches, world_size=2, tp=2, args=(2, sequence_parallel, expected))

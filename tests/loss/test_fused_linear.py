"""fused_linear_sft_loss against the float64 reference and against sft_token_loss on hidden @ weight.T.

Every case checks the loss sum, every stat, dL/dhidden and dL/dweight, at TP = 1, 2 and 4, with
and without sequence parallelism, chunk sizes that do not divide the token count, ignored
targets, a float loss mask with zeros (masked tokens), padding ids, both gradient strategies,
fp32 and bf16.

The reference (`reference_case`) takes the logits the output layer produces (hidden @ weight.T:
exact in float64 for fp32 inputs; for bf16 inputs the bf16 GEMM's logits, as the materialized
path sees them), the float64 loss of tests/loss/reference.py, and the chain rule in float64:
dL/dhidden = G @ W, dL/dW = G^T @ hidden with G = dL/dlogits.

Tolerances:
- loss and stats, fp32 and bf16: as test_loss_parity, atol 2e-5 per token (fp32 log-sum-exp of
  up to 212 terms). The loss sum adds 24 of them: atol 1e-4 (measured <= 1.5e-5). bf16 keeps
  these because both paths see the same bf16 logits (on the CPU the chunk's GEMM gives the
  whole GEMM's rows bit for bit).
- gradients, fp32: each entry of G = dL/dlogits carries fp32 rounding (~1e-7 relative) and a
  gradient entry sums h = 16 or V = 212 such products of magnitude <= ~2: atol 2e-5
  (measured <= 2.5e-6).
- gradients, bf16: dL/dhidden is G rounded to bf16 (2^-9 relative) times W in a bf16 GEMM whose
  result is rounded again, and G sums to 0 per token, so the error follows the largest terms,
  not the entry: atol 1e-2 x the gradient's largest entry, rtol 0. Measured 4.8e-3 x for the
  fused path and for the materialized one (sft_token_loss on the bf16 logits, then the output
  layer's bf16 GEMMs), which `test_materialized_bf16_path_meets_the_same_bound` holds to the
  same bound: it is the dtype's, not the fusion's.
"""

import itertools

import pytest
import torch

from sed_megatron.loss import IGNORE_INDEX, LossConfig, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss
from sed_megatron.loss import fused_linear as fused_module

from ..distributed import run_distributed
from .test_loss_parity import VARIANTS, clear_of_tau, reference_and_config

SEQ, BATCH, HIDDEN = 8, 3, 16  # 24 tokens; SEQ divisible by TP = 1, 2, 4 (sequence parallelism)
STAT_ATOL, STAT_RTOL = 2e-5, 1e-5
SUM_ATOL = 1e-4
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.bfloat16: dict(rtol=0.0)}
BF16_GRAD_ATOL_SCALE = 1e-2
CHUNK_SIZES = (5, 7, 1, 24, 100)  # 5 and 7 do not divide 24; 100 is one chunk


def make_inputs(vocab_rows, dtype, seed):
    """hidden [s, b, h], weight [V', h], target [s, b] (ignored ids included), loss_mask [s, b] (zeros included)."""
    gen = torch.Generator().manual_seed(seed)
    # Rows of varied scale give logits of varied sharpness, so top-k masses spread over (0, 1].
    scale = torch.tensor([0.1, 0.4, 1.0, 2.5])[torch.randint(0, 4, (SEQ, BATCH, 1), generator=gen)]
    hidden = (torch.randn(SEQ, BATCH, HIDDEN, generator=gen) * scale).to(dtype)
    weight = (torch.randn(vocab_rows, HIDDEN, generator=gen) * 0.8).to(dtype)
    loss_mask = torch.rand(SEQ, BATCH, generator=gen) + 0.5  # a float mask weights the tokens
    loss_mask.view(-1)[[2, 9, 17]] = 0.0  # masked tokens: stats computed, no loss, no gradient
    return hidden, weight, loss_mask


def make_target(vocab_size, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    target = torch.randint(0, vocab_size, (SEQ, BATCH), generator=gen)
    flat = target.view(-1)
    for shard in range(4):  # a target on every shard up to TP = 4
        flat[shard] = shard * vocab_size // 4 + 1
    flat[4] = vocab_size - 1
    flat[7] = IGNORE_INDEX
    flat[-1] = IGNORE_INDEX
    return target


def reference_case(hidden, weight, target, loss_mask, variant, top_k, vocab_size):
    """(cfg, reference loss sum, stats, dL/dhidden, dL/dweight, tokens clear of tau), float64."""
    if hidden.dtype == torch.float32:
        logits = hidden.double() @ weight.double().t()
    else:
        logits = (hidden @ weight.t()).double()  # the bf16 logits the output layer returns
    cfg, full, ref_loss, ref_stats = reference_and_config(logits[..., :vocab_size], target, variant, top_k)
    ref_sum = (ref_loss * loss_mask.double()).sum()
    ref_sum.backward()
    grad_logits = torch.zeros_like(logits)
    grad_logits[..., :vocab_size] = full.grad  # padding ids: no gradient
    grad_hidden = grad_logits @ weight.double()
    grad_weight = grad_logits.reshape(-1, logits.size(-1)).t() @ hidden.double().reshape(-1, hidden.size(-1))
    return cfg, ref_sum.detach(), ref_stats, grad_hidden, grad_weight, clear_of_tau(ref_stats, cfg)


def assert_grad_close(actual, expected, dtype, msg):
    tol = dict(GRAD_TOL[dtype])
    if dtype == torch.bfloat16:
        tol["atol"] = BF16_GRAD_ATOL_SCALE * float(expected.abs().max())
    torch.testing.assert_close(actual.double(), expected, **tol, msg=msg)


def check_case(dtype, top_k, variant, tp_group, rank, world_size, seed, *, chunk_size, sequence_parallel=False,
               grad_in_forward=False, padding=0, backend="torch", with_entropy=None, vocab_size=4 * 53):
    """One case on this rank against the float64 reference; raises AssertionError on a mismatch."""
    hidden, weight, loss_mask = make_inputs(vocab_size + padding, dtype, seed)
    target = make_target(vocab_size, seed)
    cfg, ref_sum, ref_stats, ref_grad_hidden, ref_grad_weight, clear = reference_case(
        hidden, weight, target, loss_mask, variant, top_k, vocab_size)
    with_entropy = seed % 2 == 0 if with_entropy is None else with_entropy

    shard = (vocab_size + padding) // world_size
    rows = slice(rank * shard, (rank + 1) * shard)
    positions = slice(rank * SEQ // world_size, (rank + 1) * SEQ // world_size) if sequence_parallel else slice(None)
    local_hidden = hidden[positions].clone().requires_grad_()
    local_weight = weight[rows].clone().requires_grad_()
    loss_sum, stats = fused_linear_sft_loss(
        local_hidden, local_weight, target, loss_mask, cfg, tp_group, chunk_size, sequence_parallel=sequence_parallel,
        vocab_size=vocab_size if padding else None, with_entropy=with_entropy, grad_in_forward=grad_in_forward,
        backend=backend)
    grad_output = 1.25  # the incoming gradient is not 1 in general (loss scaling)
    (loss_sum * grad_output).backward()

    where = (f"{dtype} k={top_k} {variant} rank {rank}/{world_size} chunk={chunk_size} sp={sequence_parallel} "
             f"grad_in_forward={grad_in_forward} padding={padding} {backend}")
    assert loss_sum.dtype == torch.float32 and loss_sum.dim() == 0, where
    expected_names = set(ref_stats) if with_entropy else set(ref_stats) - {"entropy"}
    assert set(stats) == expected_names, (where, set(stats))
    sum_atol = SUM_ATOL if clear.all() else float("inf")  # a token at tau may switch its penalty
    torch.testing.assert_close(loss_sum.double(), ref_sum, atol=sum_atol, rtol=1e-5, msg=where)
    for name, value in stats.items():
        assert value.shape == target.shape and value.dtype == torch.float32, (where, name)
        torch.testing.assert_close(value.double()[clear], ref_stats[name][clear], atol=STAT_ATOL, rtol=STAT_RTOL,
                                   msg=f"{where} {name}")
    assert torch.equal(stats["mask"][clear].bool(), ref_stats["mask"][clear].bool()), where

    if clear.all():  # a token at tau changes its gradient too
        assert local_hidden.grad.dtype == dtype and local_weight.grad.dtype == dtype, where
        assert_grad_close(local_hidden.grad, ref_grad_hidden[positions] * grad_output, dtype, f"{where} hidden")
        assert_grad_close(local_weight.grad, ref_grad_weight[rows] * grad_output, dtype, f"{where} weight")
    return loss_sum, stats


# ---------------------------------------------------------------------------------------------
# TP = 1 in this process


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_single_process_matches_reference(variant, dtype):
    for case, (chunk_size, grad_in_forward) in enumerate(itertools.product(CHUNK_SIZES, (False, True))):
        check_case(dtype, 2, variant, None, 0, 1, seed=case, chunk_size=chunk_size, grad_in_forward=grad_in_forward)


@pytest.mark.parametrize("top_k", [1, 5])
def test_single_process_top_k_and_padding_ids(top_k):
    for seed, variant in enumerate(VARIANTS):
        check_case(torch.float32, top_k, variant, None, 0, 1, seed=seed, chunk_size=5, padding=4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("variant", ["sed", "gem/h=logsigmoid"])
def test_equals_materialized_sft_token_loss(variant, dtype):
    """The contract: the same loss sum, stats and gradients as sft_token_loss on hidden @ weight.T."""
    hidden, weight, loss_mask = make_inputs(212, dtype, seed=3)
    target = make_target(212, seed=3)
    cfg, *_ = reference_case(hidden, weight, target, loss_mask, variant, 2, 212)
    results = []
    for fused in (False, True):
        leaf_hidden, leaf_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss_sum, stats = fused_linear_sft_loss(leaf_hidden, leaf_weight, target, loss_mask, cfg, chunk_size=5,
                                                    with_entropy=True)
        else:
            loss, stats = sft_token_loss(leaf_hidden @ leaf_weight.t(), target, cfg, with_entropy=True)
            loss_sum, _ = masked_sum_and_count(loss, loss_mask)
        loss_sum.backward()
        results.append((loss_sum, stats, leaf_hidden.grad, leaf_weight.grad))
    (loss_sum, stats, grad_hidden, grad_weight), (fused_sum, fused_stats, fused_hidden, fused_weight) = results
    torch.testing.assert_close(fused_sum, loss_sum, atol=SUM_ATOL, rtol=1e-5)
    assert fused_stats.keys() == stats.keys()
    for name in stats:
        torch.testing.assert_close(fused_stats[name], stats[name], atol=STAT_ATOL, rtol=STAT_RTOL, msg=name)
    if dtype == torch.float32:
        torch.testing.assert_close(fused_hidden, grad_hidden, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fused_weight, grad_weight, atol=2e-5, rtol=1e-5)
    else:  # both are within the bf16 bound of the reference (test_single_process_matches_reference)
        for fused_grad, grad in ((fused_hidden, grad_hidden), (fused_weight, grad_weight)):
            torch.testing.assert_close(fused_grad.double(), grad.double(), rtol=0,
                                       atol=2 * BF16_GRAD_ATOL_SCALE * float(grad.abs().max()))


def test_materialized_bf16_path_meets_the_same_bound():
    """The bf16 gradient tolerance is the dtype's: sft_token_loss + the output layer's GEMMs need it too."""
    hidden, weight, loss_mask = make_inputs(212, torch.bfloat16, seed=4)
    target = make_target(212, seed=4)
    cfg, _, _, ref_grad_hidden, ref_grad_weight, clear = reference_case(hidden, weight, target, loss_mask, "sed", 2,
                                                                          212)
    assert clear.all()
    leaf_hidden, leaf_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, _ = sft_token_loss(leaf_hidden @ leaf_weight.t(), target, cfg)
    masked_sum_and_count(loss, loss_mask)[0].backward()
    assert_grad_close(leaf_hidden.grad, ref_grad_hidden, torch.bfloat16, "materialized hidden")
    assert_grad_close(leaf_weight.grad, ref_grad_weight, torch.bfloat16, "materialized weight")
    # ... and the bound is not slack: the bf16 gradient is measurably off the float64 one.
    assert float((leaf_hidden.grad.double() - ref_grad_hidden).abs().max()) > 1e-4


def test_bool_mask_and_no_grad():
    hidden, weight, loss_mask = make_inputs(212, torch.float32, seed=5)
    target = make_target(212, seed=5)
    cfg, *_ = reference_case(hidden, weight, target, loss_mask, "dft", 2, 212)
    bool_mask = loss_mask > 0
    leaf = hidden.clone().requires_grad_()
    loss_sum, _ = fused_linear_sft_loss(leaf, weight, target, bool_mask, cfg, chunk_size=5)
    loss, _ = sft_token_loss(hidden @ weight.t(), target, cfg)
    torch.testing.assert_close(loss_sum, (loss * bool_mask).sum(), atol=SUM_ATOL, rtol=1e-5)
    with torch.no_grad():  # calibration and evaluation: values only, nothing kept for a backward
        no_grad_sum, stats = fused_linear_sft_loss(leaf, weight, target, bool_mask, cfg, chunk_size=5)
    assert not no_grad_sum.requires_grad
    torch.testing.assert_close(no_grad_sum, loss_sum.detach(), atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# Tensor parallelism over gloo


def tp_cases(world_size):
    """(dtype, top_k, variant, sequence_parallel, grad_in_forward, chunk_size, padding) per case.

    TP = 2: every variant x dtype x SP, the chunk sizes in turn (1 included: a collective pair
    per token). TP = 4: every variant once per dtype, SP and the gradient strategy alternating
    (four ranks share the two cores, so chunks of one token are left to TP = 2).
    """
    cases = []
    if world_size == 2:
        combos = list(itertools.product(VARIANTS, (torch.float32, torch.bfloat16), (False, True)))
        chunk_sizes = CHUNK_SIZES
    else:
        combos = [(variant, dtype, index % 2 == 0) for index, (variant, dtype) in
                  enumerate(itertools.product(VARIANTS, (torch.float32, torch.bfloat16)))]
        chunk_sizes = (5, 7, 24, 100)
    for index, (variant, dtype, sequence_parallel) in enumerate(combos):
        chunk_size = chunk_sizes[index % len(chunk_sizes)]
        cases.append((dtype, 2, variant, sequence_parallel, index % 3 == 1, chunk_size, 0))
    for index, variant in enumerate(VARIANTS):  # k = 5 and padding ids (12 ids: shards of 3 at TP = 4)
        cases.append((torch.float32, 5, variant, index % 2 == 0, index % 2 == 1, 5, 4 if world_size == 2 else 8))
    return cases


def check_tensor_parallel(world_size):
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group=tp_group)
    for seed, (dtype, top_k, variant, sp, grad_in_forward, chunk_size, padding) in enumerate(tp_cases(world_size)):
        check_case(dtype, top_k, variant, tp_group, rank, world_size, seed, chunk_size=chunk_size,
                   sequence_parallel=sp, grad_in_forward=grad_in_forward, padding=padding)
    if world_size == 2:  # in the same ranks, to spare a start-up
        check_sequence_parallel_equals_replicated(tp_group, rank, world_size)
        check_mutation_local_topk_is_caught(tp_group, rank)
        check_mutation_unscaled_local_sums_are_caught(tp_group, rank)


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    """The cases of tp_cases; at TP = 2 also SP == the replicated input, and the mutation check
    (a local instead of the global top-k must fail check_case)."""
    run_distributed(check_tensor_parallel, world_size=tp, tp=tp, args=(tp,))


def check_sequence_parallel_equals_replicated(tp_group, rank, world_size):
    """SP (sharded input, reduce-scattered gradient) == the replicated input's gradient, sliced."""
    hidden, weight, loss_mask = make_inputs(212, torch.float32, seed=6)
    target = make_target(212, seed=6)
    cfg, *_ = reference_case(hidden, weight, target, loss_mask, "sed", 2, 212)
    shard, positions = 212 // world_size, SEQ // world_size
    results = []
    for sequence_parallel in (False, True):
        local = hidden[rank * positions:(rank + 1) * positions] if sequence_parallel else hidden
        local = local.clone().requires_grad_()
        local_weight = weight[rank * shard:(rank + 1) * shard].clone().requires_grad_()
        loss_sum, stats = fused_linear_sft_loss(local, local_weight, target, loss_mask, cfg, tp_group, 5,
                                                sequence_parallel=sequence_parallel)
        loss_sum.backward()
        results.append((loss_sum, stats, local.grad, local_weight.grad))
    (loss_sum, stats, grad_hidden, grad_weight), (sp_sum, sp_stats, sp_hidden, sp_weight) = results
    torch.testing.assert_close(sp_sum, loss_sum, atol=0, rtol=0)
    for name in stats:
        torch.testing.assert_close(sp_stats[name], stats[name], atol=0, rtol=0)
    torch.testing.assert_close(sp_hidden, grad_hidden[rank * positions:(rank + 1) * positions], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sp_weight, grad_weight, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The tests can fail: mutations of the fused path are caught


def check_mutation_local_topk_is_caught(tp_group, rank):
    """A mutation: each rank uses the top-k (and max) of its own shard; the target logit is still gathered."""
    from sed_megatron.loss import vocab_parallel

    genuine = vocab_parallel.global_topk_and_target

    def local_topk_only(candidates, target_logit, target, cfg, group, world_size):
        gathered = genuine(candidates, target_logit, target, cfg, group, world_size)
        topk_logits, logits_max, _ = genuine(candidates, target_logit, target, cfg, None, 1)
        return topk_logits, logits_max, gathered[2] + gathered[1] - logits_max

    vocab_parallel.global_topk_and_target = local_topk_only
    try:
        check_case(torch.float32, 2, "ce", tp_group, rank, 2, seed=1, chunk_size=5)
    except AssertionError:
        return
    finally:
        vocab_parallel.global_topk_and_target = genuine
    raise RuntimeError("a local top-k went unnoticed")


def check_mutation_unscaled_local_sums_are_caught(tp_group, rank):
    """A mutation: the recompute scheme's forward all-reduces each rank's sums as taken relative
    to its own max, without rescaling them to the global max."""
    from sed_megatron.loss import math as loss_math

    genuine = loss_math.rescale_partial_sums

    def unscaled(local_max, logits_max, sum_exp, sum_exp_x=None, tempered=None, temperature=1.0):
        return genuine(logits_max, logits_max, sum_exp, sum_exp_x, tempered, temperature)

    loss_math.rescale_partial_sums = unscaled
    try:
        check_case(torch.float32, 2, "sed", tp_group, rank, 2, seed=1, chunk_size=5, grad_in_forward=False)
    except AssertionError:
        return
    finally:
        loss_math.rescale_partial_sums = genuine
    raise RuntimeError("unscaled local sums went unnoticed")


@pytest.mark.parametrize("grad_in_forward", [False, True])
def test_mutation_wrong_chunk_boundary_is_caught(monkeypatch, grad_in_forward):
    """Chunks of tokens that stop one token short (the forward's, and the recompute's in the
    backward): each scheme must fail check_case."""
    genuine_slices = fused_module._token_slices

    def short(num_tokens, chunk_size):
        return [slice(s.start, max(s.start, s.stop - 1)) for s in genuine_slices(num_tokens, chunk_size)]

    check_case(torch.float32, 2, "sed", None, 0, 1, seed=2, chunk_size=5, grad_in_forward=grad_in_forward)
    with monkeypatch.context() as patch:
        patch.setattr(fused_module, "_token_slices", short)
        with pytest.raises((AssertionError, RuntimeError)):  # wrong values, or per-token results of the wrong size
            check_case(torch.float32, 2, "sed", None, 0, 1, seed=2, chunk_size=5, grad_in_forward=grad_in_forward)


# ---------------------------------------------------------------------------------------------
# Megatron's weight-gradient conventions: main_grad, tied embeddings, DDP, distributed optimizer


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_accumulation_fusion_adds_into_main_grad(dtype, grad_in_forward):
    """As LinearWithGradAccumulationAndAsyncCommunication: main_grad += dL/dW, a dummy gradient, the flag set."""
    hidden, weight, loss_mask = make_inputs(212, dtype, seed=7)
    target = make_target(212, seed=7)
    cfg, _, _, _, ref_grad_weight, clear = reference_case(hidden, weight, target, loss_mask, "sed", 2, 212)
    assert clear.all()
    for zero_out_wgrad in (False, True):
        param = torch.nn.Parameter(weight.clone())
        before = torch.randn(param.shape, generator=torch.Generator().manual_seed(8))  # earlier micro-batches
        param.main_grad = before.clone()  # fp32, as Megatron's grad buffers
        param.grad_added_to_main_grad = False
        if zero_out_wgrad:
            param.zero_out_wgrad = True  # set by Megatron when the embedding shares the weight on this stage
        loss_sum, _ = fused_linear_sft_loss(hidden, param, target, loss_mask, cfg, chunk_size=5,
                                            gradient_accumulation_fusion=True, grad_in_forward=grad_in_forward,
                                            output_grad_scale=2.0)
        (loss_sum * 2.0).backward()
        assert param.grad_added_to_main_grad
        assert param.grad is not None and param.grad.shape == param.shape  # DDP's hook needs a gradient
        if zero_out_wgrad:
            assert torch.all(param.grad == 0)
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else \
            dict(atol=BF16_GRAD_ATOL_SCALE * 2 * float(ref_grad_weight.abs().max()), rtol=0)
        torch.testing.assert_close(param.main_grad.double() - before.double(), ref_grad_weight * 2.0, **tol)

    # With gradients in the forward, a backward that brings another scale than the one main_grad
    # received is an error (the sum in main_grad could not be corrected).
    if grad_in_forward:
        param = torch.nn.Parameter(weight.clone())
        param.main_grad = torch.zeros(param.shape)
        param.grad_added_to_main_grad = False
        loss_sum, _ = fused_linear_sft_loss(hidden, param, target, loss_mask, cfg, chunk_size=5,
                                            gradient_accumulation_fusion=True, grad_in_forward=True)
        with pytest.raises(RuntimeError, match=r"gradient is 3\.0, but its weight gradient went into main_grad"):
            (loss_sum * 3.0).backward()
    # Without the fusion (or without a main_grad) autograd gets the gradient, main_grad is left alone.
    param = torch.nn.Parameter(weight.clone())
    param.main_grad = torch.zeros(param.shape)
    loss_sum, _ = fused_linear_sft_loss(hidden, param, target, loss_mask, cfg, chunk_size=5,
                                        grad_in_forward=grad_in_forward)
    loss_sum.backward()
    assert torch.all(param.main_grad == 0) and param.grad.dtype == dtype


def test_frozen_weight_or_hidden_gets_no_gradient_work():
    hidden, weight, loss_mask = make_inputs(212, torch.float32, seed=9)
    target = make_target(212, seed=9)
    cfg, _, _, ref_grad_hidden, ref_grad_weight, _ = reference_case(hidden, weight, target, loss_mask, "ce", 2, 212)
    for grad_in_forward in (False, True):
        leaf = hidden.clone().requires_grad_()
        loss_sum, _ = fused_linear_sft_loss(leaf, weight, target, loss_mask, cfg, chunk_size=5,
                                            grad_in_forward=grad_in_forward)
        loss_sum.backward()
        torch.testing.assert_close(leaf.grad.double(), ref_grad_hidden, atol=2e-5, rtol=1e-5)
        leaf = weight.clone().requires_grad_()
        loss_sum, _ = fused_linear_sft_loss(hidden, leaf, target, loss_mask, cfg, chunk_size=5,
                                            grad_in_forward=grad_in_forward)
        loss_sum.backward()
        torch.testing.assert_close(leaf.grad.double(), ref_grad_weight, atol=2e-5, rtol=1e-5)


def _tiny_tied_gpt(seed):
    """A 1-layer GPTModel with tied embeddings at TP = 2 on the CPU.

    Without sequence parallelism: on the CPU layer Megatron's own SP layers cannot run their
    backward (ColumnParallelLinear allocates on the GPU there, outside the CPU device mode), which
    is why the trainer refuses SP with the local layers. The fused loss's SP path is tested on
    its own above (test_sequence_parallel_equals_replicated_input and the TP parity cases).
    """
    from megatron.core import tensor_parallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(
        num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=64,
        normalization="RMSNorm", gated_linear_unit=True, activation_func=torch.nn.functional.silu,
        add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0, tensor_model_parallel_size=2,
        use_cpu_initialization=True, params_dtype=torch.float32, gradient_accumulation_fusion=False,
        persist_layer_norm=False, bias_dropout_fusion=False, apply_rope_fusion=False, masked_softmax_fusion=False,
    )
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    model = GPTModel(config, get_gpt_layer_local_spec(normalization="RMSNorm"), vocab_size=90,
                     max_sequence_length=16, position_embedding_type="rope", share_embeddings_and_output_weights=True)
    return config, model


def check_megatron_tied_ddp():
    """A GPTModel with tied embeddings, TP = 2, DP = 2, Megatron's DDP with the distributed optimizer's
    buffers and overlapped gradient reduction: the fused loss through GPTModel's output_processor
    hook (as the trainer plugs it in) gives every parameter the main_grad the materialized path
    gives it, the shared embedding/output weight's included."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    tp_group = parallel_state.get_tensor_model_parallel_group()
    dp_rank = parallel_state.get_data_parallel_rank()
    gen = torch.Generator().manual_seed(100 + dp_rank)  # each DP rank its own micro-batch
    tokens = torch.randint(0, 90, (2, 16), generator=gen)  # [b, s]
    labels = torch.randint(0, 90, (2, 16), generator=gen)
    labels[0, :5] = IGNORE_INDEX  # a prompt
    loss_mask = (labels != IGNORE_INDEX).float()
    position_ids = torch.arange(16).expand(2, 16)
    cfg = LossConfig(kind="sed", top_k=2, tau=0.05, lam=1.0)

    def fused_output(hidden_states, output_layer, output_weight, context, **unused):
        grad_in_forward = context["grad_in_forward"]
        weight = output_layer.weight if output_weight is None else output_weight
        return fused_linear_sft_loss(
            hidden_states, weight, context["labels"].t(), context["loss_mask"].t(), cfg, output_layer.tp_group,
            chunk_size=7, sequence_parallel=output_layer.sequence_parallel, vocab_size=90,
            gradient_accumulation_fusion=True, grad_in_forward=grad_in_forward, output_grad_scale=2.0)

    results = []
    for fused in (None, False, True):  # materialized; fused (recompute); fused (gradients in the forward)
        config, model = _tiny_tied_gpt(seed=11)
        assert model.shared_embedding_or_output_weight().zero_out_wgrad  # tied on one stage
        ddp_config = DistributedDataParallelConfig(use_distributed_optimizer=True, grad_reduce_in_fp32=True,
                                                   overlap_grad_reduce=True, bucket_size=None)
        ddp = DistributedDataParallel(config, ddp_config, model)
        ddp.zero_grad_buffer()
        if fused is not None:
            loss_sum, stats = ddp(tokens, position_ids, None, output_processor=fused_output,
                                  output_processor_context={"labels": labels, "loss_mask": loss_mask,
                                                            "grad_in_forward": fused})
        else:
            logits = ddp(tokens, position_ids, None)  # [b, s, V/tp]
            loss, stats = sft_token_loss(logits, labels, cfg, tp_group, inplace=True, vocab_size=90)
            loss_sum, _ = masked_sum_and_count(loss, loss_mask)
        (loss_sum * 2.0).backward()  # a loss scale
        ddp.finish_grad_sync()
        grads = {name: param.main_grad.clone() for name, param in ddp.module.named_parameters()}
        results.append((loss_sum.detach(), stats["topk_mass"].reshape(-1).sort().values, grads))
    (loss_sum, topk, grads), *fused_results = results
    assert "embedding.word_embeddings.weight" in grads and "output_layer.weight" not in grads  # tied
    assert float(grads["embedding.word_embeddings.weight"].abs().sum()) > 0
    for fused_sum, fused_topk, fused_grads in fused_results:
        torch.testing.assert_close(fused_sum, loss_sum, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fused_topk, topk, atol=1e-6, rtol=1e-6)  # [b, s] vs [s, b]: compare sorted
        assert grads.keys() == fused_grads.keys()
        for name in grads:  # fp32 sums in another order: ~1e-7 relative
            torch.testing.assert_close(fused_grads[name], grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_megatron_gpt_tied_embeddings_distributed_optimizer():
    run_distributed(check_megatron_tied_ddp, world_size=4, tp=2)


# ---------------------------------------------------------------------------------------------
# No [tokens, V/tp] tensor larger than one chunk


@pytest.mark.parametrize("grad_in_forward", [False, True])
@pytest.mark.parametrize("dtype,variant", [(torch.float32, "sed"), (torch.bfloat16, "sed"),
                                           (torch.float32, "gem/h=logsigmoid"), (torch.bfloat16, "gem")])
def test_allocations_are_bounded_by_one_chunk(dtype, variant, grad_in_forward):
    """Every tensor the fused loss allocates, forward and backward, holds at most one chunk of logits.

    256 tokens x 512 ids, h = 8, 16-token chunks: the whole logits would be 512 KiB in fp32, one
    chunk is 32 KiB. The largest other tensors are the weight's gradient (16 KiB), the hidden's
    (8 KiB) and the per-token results (<= 8 KiB), so a bound of one fp32 chunk catches anything
    of the logits' size (the materialized path allocates 512 KiB).
    """
    from .test_loss_kinds import LargestAllocations

    tokens, vocab, hidden_size, chunk_tokens = 256, 512, 8, 16
    gen = torch.Generator().manual_seed(10)
    hidden = torch.randn(tokens, 1, hidden_size, generator=gen).to(dtype).requires_grad_()
    weight = torch.randn(vocab, hidden_size, generator=gen).to(dtype).requires_grad_()
    target = torch.randint(0, vocab, (tokens, 1), generator=gen)
    loss_mask = torch.ones(tokens, 1)
    kind, fields = VARIANTS[variant]
    cfg = LossConfig(kind=kind, tau=0.5 if kind == "sed" else None, **fields)
    bound = chunk_tokens * vocab * 4
    with LargestAllocations() as probe:
        loss_sum, _ = fused_linear_sft_loss(hidden, weight, target, loss_mask, cfg, chunk_size=chunk_tokens,
                                            with_entropy=True, grad_in_forward=grad_in_forward)
        torch.autograd.grad(loss_sum, (hidden, weight))
    assert max(probe.sizes) <= bound, (max(probe.sizes), bound)
    assert max(probe.sizes) >= chunk_tokens * vocab * dtype.itemsize  # the chunk's logits are seen
    if not grad_in_forward:  # the probe sees the materialized path's logits
        with LargestAllocations() as probe:
            loss, _ = sft_token_loss(hidden @ weight.t(), target, cfg, inplace=True)
            torch.autograd.grad(masked_sum_and_count(loss, loss_mask)[0], (hidden, weight))
        assert max(probe.sizes) >= tokens * vocab * dtype.itemsize


# ---------------------------------------------------------------------------------------------
# The Triton kernels, run on the CPU by Triton's interpreter (TRITON_INTERPRET=1)


@pytest.fixture
def triton_interpreter():
    """The ranks run the kernels under Triton's interpreter (TRITON_INTERPRET=1, set for them)."""
    from sed_megatron.loss import triton_kernels

    if not triton_kernels.HAVE_TRITON:
        pytest.fail("Triton is not installed: the kernels cannot be checked (pip install triton)")


def _interpreted_kernels(block_columns):
    """In a spawned rank: the kernels module, with small column blocks so that a row takes several
    steps of the online max, sums and top-k merge (the interpreter's time grows with the steps)."""
    from sed_megatron.loss import triton_kernels

    assert triton_kernels.interpreting() and triton_kernels.available(torch.device("cpu"))
    triton_kernels.BLOCK_COLUMNS = block_columns
    return triton_kernels


def check_triton_kernels_on_a_chunk(dtype):
    """Both passes on one chunk, against torch: ties, padding ids, rows shorter than k, an empty shard."""
    kernels = _interpreted_kernels(16)
    gen = torch.Generator().manual_seed(12)
    rows, columns, real = 6, 70, 61  # 9 padding ids; 4 column steps of 16 (the last one partial)
    logits = (torch.randn(rows, columns, generator=gen) * 3).to(dtype)
    logits[0, 10] = logits[0, 40] = logits[0, 60] = 50.0  # a three-way tie for the max
    logits[1, :real] = 1.5  # all equal
    logits[2, real:] = 100.0  # padding ids that would win if they were read
    index = torch.tensor([10, 3, 60, 0, 33, 7])
    in_shard = torch.tensor([True, True, True, False, True, True])
    values = logits[:, :real].float()
    for count, temperature in ((1, 1.0), (3, 0.7), (5, 1.0)):
        local_max, sum_exp, sum_exp_x, tempered, candidates, target_logit = kernels.local_shard_stats(
            logits, index, in_shard, real, count, with_entropy=True, temperature=temperature)
        torch.testing.assert_close(local_max, values.amax(-1), atol=0, rtol=0)
        shifted = values - values.amax(-1, keepdim=True)
        torch.testing.assert_close(sum_exp, shifted.exp().sum(-1), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(sum_exp_x, (shifted.exp() * shifted).sum(-1), atol=1e-5, rtol=1e-5)
        if temperature == 1.0:
            assert tempered is None
        else:  # GEM's tempered sums, taken online as the max grows
            a = (shifted / temperature).exp()
            torch.testing.assert_close(tempered[0], a.sum(-1), atol=1e-6, rtol=1e-6)
            torch.testing.assert_close(tempered[1], (a * shifted).sum(-1), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(candidates.sort(-1).values, values.topk(count, -1).values.sort(-1).values,
                                   atol=0, rtol=0)
        torch.testing.assert_close(target_logit, torch.where(in_shard, values.gather(-1, index[:, None])[:, 0], 0.0),
                                   atol=0, rtol=0)
    # A shard of padding only (the last rank of a padded vocabulary): nothing, and -inf candidates.
    local_max, sum_exp, _, _, candidates, target_logit = kernels.local_shard_stats(
        logits, index, torch.zeros(rows, dtype=torch.bool), 0, 2, with_entropy=False)
    assert torch.all(local_max == float("-inf")) and torch.all(sum_exp == 0) and torch.all(candidates == float("-inf"))
    assert torch.all(target_logit == 0)

    logits_max = values.amax(-1) + 0.25  # any m
    coef = torch.rand(rows, generator=gen) + 0.5
    normalizer = (values - logits_max[:, None]).exp().sum(-1)
    expected = coef[:, None] * (values - logits_max[:, None]).exp() / normalizer[:, None]
    expected = torch.cat([expected, torch.zeros(rows, columns - real)], dim=-1)
    expected[torch.arange(rows), index] -= coef * in_shard
    grad = kernels.write_gradient_(logits.clone(), logits_max, coef / normalizer, coef * in_shard, index, real)
    assert grad.dtype == dtype
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=8e-3)  # one bf16 rounding
    torch.testing.assert_close(grad.float(), expected, **tol)
    # The tempered form: coef * softmax(z / T) - coef * onehot(y).
    tempered = ((values - logits_max[:, None]) / 0.7).exp()
    expected = torch.cat([coef[:, None] * tempered / tempered.sum(-1, keepdim=True), torch.zeros(rows, columns - real)],
                         dim=-1)
    expected[torch.arange(rows), index] -= coef * in_shard
    grad = kernels.write_gradient_(logits.clone(), logits_max, coef / tempered.sum(-1), coef * in_shard, index, real,
                                   temperature=0.7)
    torch.testing.assert_close(grad.float(), expected, **tol)


def check_triton_backend(world_size):
    """The fused loss with backend="triton" against the float64 reference, as check_case does for "torch"."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    if world_size == 1:
        for dtype in (torch.float32, torch.bfloat16):
            check_triton_kernels_on_a_chunk(dtype)
        tp_group, rank = None, 0
        cases = [  # (dtype, top_k, variant, chunk_size, sequence_parallel, grad_in_forward, padding)
            (torch.float32, 2, "ce", 7, False, False, 0),
            (torch.bfloat16, 2, "dft", 10, False, True, 0),
            (torch.float32, 1, "sed", 24, False, True, 4),
            (torch.bfloat16, 5, "sed/mask=none", 9, False, False, 4),
            (torch.float32, 2, "gem", 7, False, True, 4),  # the tempered softmax form, T = beta
            (torch.bfloat16, 2, "gem", 24, False, False, 0),
        ]
    else:
        tp_group = parallel_state.get_tensor_model_parallel_group()
        rank = dist.get_rank(group=tp_group)
        cases = [
            (torch.float32, 5, "sed", 7, True, False, 4),
            (torch.bfloat16, 2, "dft", 10, False, True, 0),
            (torch.float32, 2, "gem", 9, True, False, 4),
        ]
    _interpreted_kernels(64)  # 212 ids: 4 steps per row
    for seed, (dtype, top_k, variant, chunk_size, sp, grad_in_forward, padding) in enumerate(cases):
        check_case(dtype, top_k, variant, tp_group, rank, world_size, seed, chunk_size=chunk_size,
                   sequence_parallel=sp, grad_in_forward=grad_in_forward, padding=padding, backend="triton",
                   with_entropy=seed % 2 == 0)


@pytest.mark.parametrize("tp", [1, 2])
def test_triton_kernels_under_the_interpreter(triton_interpreter, tp):
    """Triton's interpreter runs the kernels on the CPU: one chunk against torch, then the fused
    loss with the Triton backend against the reference at TP = 1 and 2 (with SP)."""
    # Ranks of their own: Triton reads TRITON_INTERPRET when a process first imports it.
    run_distributed(check_triton_backend, world_size=tp, tp=tp, args=(tp,), env={"TRITON_INTERPRET": "1"})


def test_backend_choice():
    hidden, weight, loss_mask = make_inputs(212, torch.float32, seed=13)
    target = make_target(212, seed=13)
    with pytest.raises(ValueError, match="do not cover loss kind 'gem'"):
        fused_linear_sft_loss(hidden, weight, target, loss_mask, LossConfig(kind="gem", gem_h="logsigmoid"),
                              backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_linear_sft_loss(hidden, weight, target, loss_mask, LossConfig(), backend="cuda")
    assert not fused_module._use_triton("auto", fused_module.get_kind("ce"), LossConfig(), torch.device("cpu"))


@pytest.mark.parametrize(
    "change,error,message",
    [
        (dict(target=torch.zeros(8, 2, dtype=torch.int64)), ValueError, "does not match the tokens of hidden"),
        (dict(loss_mask=torch.ones(8, 2)), ValueError, "loss_mask shape"),
        (dict(weight=torch.zeros(212, 15)), ValueError, r"weight must be \[V/tp, h\]"),
        (dict(weight=torch.zeros(212, 16, dtype=torch.float64)), TypeError, "share dtype"),
        (dict(target=torch.full((8, 3), 212)), ValueError, "fused_linear_sft_loss: target id 212"),
        (dict(chunk_size=0), ValueError, "chunk_size"),
    ],
)
def test_input_errors(change, error, message):
    hidden, weight, loss_mask = make_inputs(212, torch.float32, seed=14)
    args = dict(hidden=hidden, weight=weight, target=make_target(212, seed=14), loss_mask=loss_mask, chunk_size=None)
    args.update(change)
    with pytest.raises(error, match=message):
        fused_linear_sft_loss(args["hidden"], args["weight"], args["target"], args["loss_mask"], LossConfig(),
                              chunk_size=args["chunk_size"])

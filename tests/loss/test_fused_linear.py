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

from sed_megatron.loss import IGNORE_INDEX, fused_linear_sft_loss, masked_sum_and_count, sft_token_loss
from sed_megatron.loss import fused_linear as fused_module
from sed_megatron.testing.distributed import run_distributed

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
    """(dtype, top_k, variant, sequence_parallel, grad_in_forward, chunk_size, padding) per case."""
    cases = []
    for index, (variant, dtype, sequence_parallel) in enumerate(
            itertools.product(VARIANTS, (torch.float32, torch.bfloat16), (False, True))):
        chunk_size = CHUNK_SIZES[index % len(CHUNK_SIZES)]
        cases.append((dtype, 2, variant, sequence_parallel, index % 2 == 1, chunk_size, 0))
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


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_matches_reference(tp):
    run_distributed(check_tensor_parallel, world_size=tp, tp=tp, args=(tp,))


def check_sequence_parallel_equals_replicated():
    """SP (sharded input, reduce-scattered gradient) == the replicated input's gradient, sliced."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank, world_size = dist.get_rank(group=tp_group), dist.get_world_size(group=tp_group)
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


def test_sequence_parallel_equals_replicated_input():
    run_distributed(check_sequence_parallel_equals_replicated, world_size=2, tp=2)


# ---------------------------------------------------------------------------------------------
# The tests can fail: mutations of the fused path are caught


def check_mutation_local_topk_is_caught():
    """A mutation: each rank uses the top-k (and max) of its own shard; the target logit is still gathered."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from sed_megatron.loss import vocab_parallel

    tp_group = parallel_state.get_tensor_model_parallel_group()
    rank = dist.get_rank(group=tp_group)
    check_case(torch.float32, 2, "ce", tp_group, rank, 2, seed=1, chunk_size=5)  # the genuine path passes
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


def test_mutation_local_instead_of_global_topk_is_caught():
    run_distributed(check_mutation_local_topk_is_caught, world_size=2, tp=2)


def test_mutation_wrong_chunk_boundary_is_caught(monkeypatch):
    genuine = fused_module._token_slices

    def overlapping(num_tokens, chunk_size):  # every chunk but the first starts one token early
        return [slice(max(0, s.start - 1), s.stop) for s in genuine(num_tokens, chunk_size)]

    check_case(torch.float32, 2, "sed", None, 0, 1, seed=2, chunk_size=5)
    monkeypatch.setattr(fused_module, "_token_slices", overlapping)
    with pytest.raises(AssertionError):
        check_case(torch.float32, 2, "sed", None, 0, 1, seed=2, chunk_size=5)


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
                                            gradient_accumulation_fusion=True, grad_in_forward=grad_in_forward)
        (loss_sum * 2.0).backward()
        assert param.grad_added_to_main_grad
        assert param.grad is not None and param.grad.shape == param.shape  # DDP's hook needs a gradient
        if zero_out_wgrad:
            assert torch.all(param.grad == 0)
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else \
            dict(atol=BF16_GRAD_ATOL_SCALE * 2 * float(ref_grad_weight.abs().max()), rtol=0)
        torch.testing.assert_close(param.main_grad.double() - before.double(), ref_grad_weight * 2.0, **tol)

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

    from sed_megatron.loss import LossConfig

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
            gradient_accumulation_fusion=True, grad_in_forward=grad_in_forward)

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

"""The fused output-layer loss: logits = hidden @ weight.T and the SFT token loss, chunk by chunk.

    loss_sum, stats = fused_linear_sft_loss(hidden, weight, target, loss_mask, cfg, tp_group)

The same per-token loss as `sft_token_loss(hidden @ weight.T, target, cfg, tp_group)`, summed
over the loss tokens, without ever holding the `[tokens, V/tp]` logits: each chunk of tokens
gets its logits from one GEMM, the loss of every kind from the same steps as sft_token_loss
(`vocab_parallel.shard_loss_forward`: local top-k -> all-gather -> global max and z_y ->
exp and partial sums -> all-reduce -> the kind's loss), and the chunk's logits are dropped.

Gradients (default, `grad_in_forward=False`): the forward keeps per token only the global max,
the reduced sums and the gradient coefficient (loss_mask * the kind's grad_scale); the backward
recomputes the logits block by block of the vocabulary (`_recompute_gradients`: a logit's
gradient needs only those per-token results, so every backward GEMM spans all tokens and reads
each weight row once) and forms G = coef * d loss / d z in place, then dL/dhidden += G @ W[block]
and dL/dW[block] += G^T @ hidden. Four GEMMs instead of three, no collective in the backward
but the hidden gradient's reduction, and no block larger than one chunk of logits: the
memory-lean form (Megatron-LM's own linear cross entropy and Cut Cross-Entropy recompute too).
The backward skips the tokens whose coefficient is 0 (prompt tokens, loss_mask = 0), whose
gradient is exactly 0.

`grad_in_forward=True` forms G right after each chunk's loss in the forward (three GEMMs, no
recompute) and keeps dL/dhidden `[t, h]` and dL/dW (an fp32 `[V/tp, h]` accumulator) until the
backward, which only scales them by the incoming gradient. It trades one GEMM per token for a
weight-sized buffer: docs/PERFORMANCE.md measures both.

Tensor parallelism: the collectives of each chunk are sft_token_loss's, so the global top-k,
log-sum-exp and p_target are the same. The hidden gradient is summed over the group (an
all-reduce, as Megatron's ColumnParallelLinear does for its input) or, with
sequence_parallel=True, the input is the local sequence shard `[s/tp, b, h]`: it is
all-gathered along the sequence on the way in and its gradient reduce-scattered on the way out.
This Function owns those two collectives; the per-chunk ones are vocab_parallel's.

Weight gradient: with gradient_accumulation_fusion=True and a `weight.main_grad` (Megatron's
DDP buffers) it is accumulated into main_grad and the Function returns Megatron's dummy
gradient (zeros when the weight is shared with the embedding on the same stage,
`weight.zero_out_wgrad`) with `weight.grad_added_to_main_grad = True`, exactly as
LinearWithGradAccumulationAndAsyncCommunication does; otherwise autograd gets it.

Backends: "torch" runs everywhere; "triton" (`triton_kernels.py`, a GPU or Triton's
interpreter) replaces the chunk's loss passes by two kernels for the kinds whose gradient is the
CE form times a per-token scale (ce, dft, sed); "auto" takes Triton on a GPU when it applies.
"""

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import chunks, triton_kernels
from . import math as loss_math
from .config import LossConfig
from .kinds import TokenSums, get_kind
from .vocab_parallel import (
    ShardLoss,
    all_reduce_sums_,
    global_topk_and_target,
    group_rank_and_size,
    real_columns,
    shard_loss_forward,
    shifted_buffer,
    token_results,
    validate_target_ids,
)

BACKENDS = ("auto", "torch", "triton")

_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class _Options:
    cfg: LossConfig
    tp_group: object
    sequence_parallel: bool
    chunk_size: int
    with_entropy: bool
    vocab_size: int
    grad_in_forward: bool
    accumulate_into_main_grad: bool
    use_triton: bool
    need_hidden_grad: bool
    need_weight_grad: bool


def _gather_sequence(hidden, tp_group, world_size):
    """`[s/tp, ...]` on each rank -> `[s, ...]`, rank order along dim 0 (the sequence)."""
    total = hidden.new_empty((world_size * hidden.size(0), *hidden.shape[1:]))
    _all_gather_into(total, hidden.contiguous(), group=tp_group)
    return total


def _reduce_scatter_sequence(grad, tp_group, world_size):
    """`[s, ...]` on each rank -> this rank's `[s/tp, ...]` of the sum over ranks."""
    local = grad.new_empty((grad.size(0) // world_size, *grad.shape[1:]))
    _reduce_scatter_into(local, grad.contiguous(), group=tp_group)
    return local


@functools.lru_cache(maxsize=None)
def _fused_wgrad_accumulate():
    """apex's fp32-accumulating weight-gradient GEMM (what Megatron's gradient-accumulation fusion calls), or None."""
    try:
        import fused_weight_gradient_mlp_cuda
    except ImportError:
        return None
    return fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32


def _chunk_forward(logits, target, opts: _Options, kind, rank, world_size, real) -> ShardLoss:
    """The loss of one chunk from its logits `[c, V/tp]` (consumed: they become the fp32 buffer or stay for the kernels)."""
    if not opts.use_triton:
        return shard_loss_forward(logits, target, opts.cfg, opts.tp_group, True, opts.with_entropy, opts.vocab_size)
    shard_size = logits.size(-1)
    index, in_shard = loss_math.shard_target_index(target, rank * shard_size, (rank + 1) * shard_size)
    local_max, sum_exp, sum_exp_x, candidates, target_part = triton_kernels.local_shard_stats(
        logits, index, in_shard, real, min(opts.cfg.top_k, shard_size), opts.with_entropy)
    topk_logits, logits_max, target_shifted = global_topk_and_target(candidates, target_part, target, opts.cfg,
                                                                      opts.tp_group, world_size)
    partial = all_reduce_sums_(loss_math.rescale_partial_sums(local_max, logits_max, sum_exp, sum_exp_x),
                               opts.tp_group, world_size)
    sums, kind_loss, stat_values = token_results(target, target_shifted, partial, topk_logits, logits_max, kind,
                                                 opts.cfg, opts.with_entropy)
    return ShardLoss(None, index, in_shard, logits_max, sums, kind_loss, stat_values)


def _chunk_gradient(logits, buffer, opts: _Options, kind, sums: TokenSums, logits_max, coef, index, in_shard, real):
    """coef * d loss / d z for one chunk, in place: in the logits (Triton, their dtype) or the fp32 buffer.

    buffer: exp(z - m) from the forward, or None to recompute it from the logits.
    """
    if opts.use_triton:
        return triton_kernels.write_gradient_(logits, logits_max, coef / sums.sum_exp, coef * in_shard, index, real)
    if buffer is None:
        buffer = shifted_buffer(logits, logits_max, real, inplace=True).exp_()
    return kind.gradient_(opts.cfg, buffer, sums, coef, index, in_shard)


def _cpu_16bit_hidden_grad(grad, weight, out):
    """out = G @ W for a 16-bit W on the CPU: fp32 GEMMs over blocks of vocabulary rows.

    PyTorch's CPU bf16 GEMM with the vocabulary as its inner dim runs at ~0.2 GFLOP/s on a CPU
    without bf16 instructions (the dev machine), ~50x slower than fp32 in blocks; the casts are
    one block of W and G at a time. (On a GPU the 16-bit GEMM is used, as Megatron's layer does.)
    """
    total = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
    rows = max(1, chunks.CHUNK_ELEMENTS // weight.size(1))
    for start in range(0, weight.size(0), rows):
        block = slice(start, start + rows)
        total.addmm_(grad[:, block].float(), weight[block].float())
    out.copy_(total)


def _accumulate_weight_grad_(wgrad, grad, hidden):
    """wgrad `[v, h]` += G^T @ hidden for G `[t, v]`, hidden `[t, h]` (wgrad fp32 for 16-bit weights)."""
    if grad.dtype == hidden.dtype == wgrad.dtype:
        wgrad.addmm_(grad.t(), hidden)
        return
    fused = _fused_wgrad_accumulate() if wgrad.is_cuda and wgrad.dtype == torch.float32 else None
    if fused is not None and hidden.dtype in (torch.bfloat16, torch.float16):
        fused(hidden.contiguous(), grad.to(hidden.dtype).contiguous(), wgrad)  # 16-bit GEMM, fp32 accumulation
        return
    # Mixed precision without the fused GEMM: casts of the operands, one fp32 GEMM into the accumulator.
    wgrad.addmm_(grad.to(wgrad.dtype).t(), hidden.to(wgrad.dtype))


def _apply_gradient(grad, hidden_rows, weight, grad_hidden_rows, wgrad):
    """grad_in_forward, one chunk of tokens: dL/dhidden[rows] = G @ W and wgrad += G^T @ hidden[rows]."""
    if grad_hidden_rows is not None:
        if not weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
            _cpu_16bit_hidden_grad(grad, weight, grad_hidden_rows)
        else:
            torch.matmul(grad.to(weight.dtype), weight, out=grad_hidden_rows)  # [c, h], as the output layer's backward
    if wgrad is not None:
        _accumulate_weight_grad_(wgrad, grad, hidden_rows)


def _accumulate_hidden_grad_(grad_hidden, grad, weight_block):
    """grad_hidden `[t, h]` += G @ W[block] for G `[t, v]` (grad_hidden fp32 for 16-bit weights)."""
    if grad.dtype == weight_block.dtype == grad_hidden.dtype:
        grad_hidden.addmm_(grad, weight_block)
    elif weight_block.is_cuda:  # the 16-bit GEMM of the output layer's backward, added up in fp32
        grad_hidden.add_(grad.to(weight_block.dtype) @ weight_block)
    else:  # see _cpu_16bit_hidden_grad: fp32 GEMM, block-sized casts
        grad_hidden.addmm_(grad.float(), weight_block.float())


def _weight_grad_accumulator(weight, main_grad):
    """Where dL/dW accumulates: main_grad (gradient-accumulation fusion) or a new zeroed tensor (fp32 for 16-bit weights)."""
    if main_grad is not None:
        return main_grad
    dtype = torch.float32 if weight.dtype in (torch.bfloat16, torch.float16) else weight.dtype
    return torch.zeros(weight.shape, dtype=dtype, device=weight.device)


def _megatron_dummy_weight_grad(weight, main_grad):
    """What Megatron's linear layer returns for a weight whose gradient went into main_grad."""
    if not hasattr(weight, "grad_added_to_main_grad"):
        return None
    # A weight shared with the embedding on this stage: autograd adds the embedding's gradient to
    # this one and the DDP hook adds the sum to main_grad (zero_out_wgrad), so it must be zeros.
    make = torch.zeros if getattr(weight, "zero_out_wgrad", False) else torch.empty
    weight.grad_added_to_main_grad = True
    return make(main_grad.shape, dtype=weight.dtype, device=weight.device)


class _FusedLinearSFTLoss(torch.autograd.Function):
    """hidden `[s(/tp), b, h]`, weight `[V/tp, h]`, target and loss_mask `[s, b]` -> loss sum and the stats `[t]`."""

    @staticmethod
    def forward(ctx, hidden, weight, target, loss_mask, opts: _Options):
        rank, world_size = group_rank_and_size(opts.tp_group)
        total = _gather_sequence(hidden, opts.tp_group, world_size) if opts.sequence_parallel and world_size > 1 \
            else hidden
        flat_hidden = total.reshape(-1, total.size(-1))  # [t, h]
        flat_target = target.reshape(-1)  # [t]
        mask = loss_mask.reshape(-1).to(torch.float32)  # [t]
        num_tokens, device = flat_target.numel(), flat_hidden.device
        kind = get_kind(opts.cfg.kind)
        names = loss_math.stat_names(kind, opts.with_entropy)
        shard_size = weight.size(0)
        real = real_columns(opts.vocab_size, rank * shard_size, shard_size)
        need_grad = opts.need_hidden_grad or opts.need_weight_grad
        main_grad = weight.main_grad if opts.accumulate_into_main_grad and opts.need_weight_grad else None

        token_loss = torch.empty(num_tokens, dtype=torch.float32, device=device)
        stats = torch.empty(len(names), num_tokens, dtype=torch.float32, device=device)
        keep = need_grad and not opts.grad_in_forward  # per-token results for the recompute
        if keep:
            num_extra = len(kind.sum_names(opts.cfg))
            per_token = torch.empty(4 + num_extra, num_tokens, dtype=torch.float32, device=device)
            logits_max, sum_exp, target_shifted, coef, extra = per_token[0], per_token[1], per_token[2], \
                per_token[3], per_token[4:]
        grad_hidden = wgrad = None
        if need_grad and opts.grad_in_forward:
            grad_hidden = torch.empty_like(flat_hidden) if opts.need_hidden_grad else None
            if opts.need_weight_grad:  # the incoming gradient is not known yet: never main_grad itself
                wgrad = _weight_grad_accumulator(weight, None if main_grad is None else
                                                 torch.zeros_like(main_grad))

        for rows in _token_slices(num_tokens, opts.chunk_size):
            logits = flat_hidden[rows] @ weight.t()  # [c, V/tp], the output layer's dtype
            result = _chunk_forward(logits, flat_target[rows], opts, kind, rank, world_size, real)
            if not opts.use_triton:
                del logits  # fp32: it is the buffer; 16-bit: the buffer is an fp32 copy
            token_loss[rows] = result.kind_loss.loss
            stats[:, rows] = torch.stack(result.stat_values)
            if keep:
                logits_max[rows], sum_exp[rows], target_shifted[rows] = (result.logits_max, result.sums.sum_exp,
                                                                          result.sums.target_logit)
                coef[rows] = mask[rows] * result.kind_loss.grad_scale
                extra[:, rows] = result.sums.extra
            elif need_grad:
                grad = _chunk_gradient(logits if opts.use_triton else None, result.buffer, opts, kind, result.sums,
                                       result.logits_max, mask[rows] * result.kind_loss.grad_scale, result.index,
                                       result.in_shard, real)
                logits = result = None  # the chunk's logits (Triton) or buffer now hold the gradient
                _apply_gradient(grad, flat_hidden[rows], weight, None if grad_hidden is None else grad_hidden[rows],
                                wgrad)
                del grad
            logits = result = None  # one chunk at a time: drop it before the next GEMM
        loss_sum = (token_loss * mask).sum()

        ctx.opts, ctx.real, ctx.hidden_shape = opts, real, hidden.shape
        ctx.num_tokens, ctx.weight_dtype = num_tokens, weight.dtype
        # Like Megatron's linear layer: main_grad lives on ctx (not saved: the buffer is
        # updated in place), and so does the weight whose grad_added_to_main_grad is set.
        ctx.main_grad, ctx.main_grad_weight = main_grad, (weight if main_grad is not None else None)
        if keep:
            ctx.save_for_backward(hidden, weight, flat_target, per_token)
        elif need_grad:
            ctx.save_for_backward(grad_hidden, wgrad)
        stat_values = tuple(stats)
        ctx.mark_non_differentiable(*stat_values)
        return (loss_sum, *stat_values)

    @staticmethod
    def backward(ctx, grad_loss_sum, *unused_stat_grads):
        opts: _Options = ctx.opts
        rank, world_size = group_rank_and_size(opts.tp_group)
        scale = grad_loss_sum.float()  # 0-dim
        if opts.grad_in_forward:
            grad_hidden, wgrad = ctx.saved_tensors
            if grad_hidden is not None:
                grad_hidden.mul_(scale.to(grad_hidden.dtype))
            if wgrad is not None:
                wgrad.mul_(scale)
                if ctx.main_grad is not None:
                    ctx.main_grad.add_(wgrad)
        else:
            grad_hidden, wgrad = _recompute_gradients(ctx, scale, rank, world_size)

        if grad_hidden is not None:
            total_shape = (ctx.hidden_shape[0] * (world_size if opts.sequence_parallel else 1), *ctx.hidden_shape[1:])
            grad_hidden = grad_hidden.view(total_shape)
            if world_size > 1 and opts.sequence_parallel:
                grad_hidden = _reduce_scatter_sequence(grad_hidden, opts.tp_group, world_size)
            elif world_size > 1:
                dist.all_reduce(grad_hidden, group=opts.tp_group)
        grad_weight = None
        if wgrad is not None:
            if ctx.main_grad is not None:
                grad_weight = _megatron_dummy_weight_grad(ctx.main_grad_weight, ctx.main_grad)
            else:
                grad_weight = wgrad.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _token_slices(num_tokens, chunk_size):
    return [slice(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


def _vocab_blocks(shard_size, num_tokens, chunk_size):
    """Row slices of the weight for the backward: a block of logits `[t, rows]` holds at most the
    elements of one forward chunk (chunk_size x V/tp), so chunk_size bounds both passes."""
    rows = max(1, chunk_size * shard_size // max(1, num_tokens))
    return [slice(start, min(start + rows, shard_size)) for start in range(0, shard_size, rows)]


def _recompute_gradients(ctx, scale, rank, world_size):
    """The default backward, block by block of the vocabulary. -> (dL/dhidden `[t, h]`, wgrad).

    The gradient of a logit needs only per-token results (the global max and sums, kept from the
    forward) and the logit itself, so the backward may walk the vocabulary instead of the tokens:
    each block recomputes logits `[t, rows]` = hidden @ W[block]^T, forms G in place and adds
    G @ W[block] to dL/dhidden and G^T @ hidden to dL/dW[block]. Every GEMM then spans all
    tokens, each weight row is read once and each gradient row written once; in chunks of tokens
    the weight and its fp32 gradient would be read (and the gradient written) once per chunk.
    """
    opts: _Options = ctx.opts
    hidden, weight, flat_target, per_token = ctx.saved_tensors
    total = _gather_sequence(hidden, opts.tp_group, world_size) if opts.sequence_parallel and world_size > 1 \
        else hidden
    flat_hidden = total.reshape(-1, total.size(-1))  # [t, h]
    kind = get_kind(opts.cfg.kind)
    shard_size = weight.size(0)
    coef = per_token[3] * scale  # [t]
    # Tokens with a zero coefficient (loss_mask = 0, ignored targets) have an exactly zero
    # gradient: the GEMMs run on the others only (one host sync to count them).
    active = torch.nonzero(coef).squeeze(-1)
    everything = active.numel() == flat_target.numel()
    if not everything:
        flat_hidden, flat_target = flat_hidden.index_select(0, active), flat_target.index_select(0, active)
        per_token, coef = per_token.index_select(1, active), coef.index_select(0, active)
    sums = TokenSums(per_token[1], per_token[2], per_token[4:])
    logits_max = per_token[0]
    index, in_shard = loss_math.shard_target_index(flat_target, rank * shard_size, (rank + 1) * shard_size)

    sixteen_bit = weight.dtype in (torch.bfloat16, torch.float16)
    grad_hidden = None
    if opts.need_hidden_grad:  # fp32 across the blocks, rounded once at the end
        grad_hidden = torch.zeros(flat_hidden.shape, dtype=torch.float32 if sixteen_bit else flat_hidden.dtype,
                                  device=flat_hidden.device)
    wgrad = _weight_grad_accumulator(weight, ctx.main_grad) if opts.need_weight_grad else None
    # The weight-gradient GEMM's other operand, cast once if it must be (16-bit without the fused GEMM).
    hidden_for_wgrad = flat_hidden
    if wgrad is not None and wgrad.dtype != flat_hidden.dtype and not (
            wgrad.is_cuda and _fused_wgrad_accumulate() is not None and wgrad.dtype == torch.float32):
        hidden_for_wgrad = flat_hidden.to(wgrad.dtype)
    for block in _vocab_blocks(shard_size, active.numel(), opts.chunk_size):
        weight_block = weight[block]  # [rows, h]
        logits = flat_hidden @ weight_block.t()  # [t, rows], recomputed
        in_block = in_shard & (index >= block.start) & (index < block.stop)
        block_index = torch.where(in_block, index - block.start, 0)
        block_real = max(0, min(block.stop, ctx.real) - block.start)
        grad = _chunk_gradient(logits, None, opts, kind, sums, logits_max, coef, block_index, in_block, block_real)
        del logits
        if grad_hidden is not None:
            _accumulate_hidden_grad_(grad_hidden, grad, weight_block)
        if wgrad is not None:
            _accumulate_weight_grad_(wgrad[block], grad, hidden_for_wgrad)
        del grad
    del hidden_for_wgrad

    if grad_hidden is not None:
        grad_hidden = grad_hidden.to(flat_hidden.dtype)
        if not everything:
            grad_hidden = grad_hidden.new_zeros((ctx.num_tokens, grad_hidden.size(-1))).index_copy_(0, active,
                                                                                                    grad_hidden)
    return grad_hidden, wgrad


def _use_triton(backend, kind, cfg, device):
    if backend not in BACKENDS:
        raise ValueError(f"fused_linear_sft_loss: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    fits = triton_kernels.supports(kind, cfg)
    if backend == "triton":
        if not fits:
            raise ValueError(f"fused_linear_sft_loss: the Triton kernels do not cover loss kind {cfg.kind!r} "
                             f"(extra sums or its own gradient form); use backend='torch' or 'auto'")
        if not triton_kernels.available(device):
            raise ValueError("fused_linear_sft_loss: backend='triton' needs Triton and a GPU (or TRITON_INTERPRET=1)")
        return True
    return fits and device.type == "cuda" and triton_kernels.available(device)


def _validate_inputs(hidden, weight, target, loss_mask, cfg, world_size, sequence_parallel):
    name = "fused_linear_sft_loss"
    if not isinstance(cfg, LossConfig):
        raise TypeError(f"{name}: cfg must be a LossConfig, got {type(cfg).__name__}")
    if not hidden.is_floating_point() or hidden.dim() < 2:
        raise ValueError(f"{name}: hidden must be a float [s, b, h] tensor, got {hidden.dtype} {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.size(1) != hidden.size(-1):
        raise ValueError(f"{name}: weight must be [V/tp, h] with h = {hidden.size(-1)} (hidden's last dim), "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise TypeError(f"{name}: hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, "
                        f"{weight.device}) must share dtype and device")
    if target.dtype != torch.int64:
        raise TypeError(f"{name}: target must be int64 token ids, got {target.dtype}")
    tokens = (hidden.size(0) * (world_size if sequence_parallel else 1), *hidden.shape[1:-1])
    if tuple(target.shape) != tokens:
        where = " (sequence_parallel: hidden holds s/tp of the s positions)" if sequence_parallel else ""
        raise ValueError(f"{name}: target shape {tuple(target.shape)} does not match the tokens of hidden "
                         f"{tuple(hidden.shape)}: expected {tokens}{where}")
    if tuple(loss_mask.shape) != tokens:
        raise ValueError(f"{name}: loss_mask shape {tuple(loss_mask.shape)} does not match target {tokens}")


def fused_linear_sft_loss(hidden, weight, target, loss_mask, cfg: LossConfig, tp_group=None, chunk_size=None, *,
                          sequence_parallel=False, vocab_size=None, with_entropy=False,
                          gradient_accumulation_fusion=False, grad_in_forward=False, backend="auto"):
    """sum(loss_mask * loss) of the output layer and the SFT token loss, without the `[t, V/tp]` logits.

    The per-token loss is sft_token_loss(hidden @ weight.T, target, cfg, tp_group)'s.

    Args:
        hidden: `[s, b, h]` float, the output layer's input: the whole sequence, the same on
            every rank of tp_group; with sequence_parallel=True this rank's `[s/tp, b, h]` shard
            of it (Megatron's sequence-parallel layout), gathered here.
        weight: `[V/tp, h]`, same dtype as hidden: this rank's contiguous rows of the output
            layer (ids [r V/tp, (r+1) V/tp)); the embedding's weight when they are tied.
        target: `[s, b]` int64 global token ids (IGNORE_INDEX -100: no loss, no gradient).
        loss_mask: `[s, b]` float or bool; weights each token's loss in the sum and its gradient.
        cfg: the LossConfig.
        tp_group: the tensor-parallel group; None means a single process.
        chunk_size: tokens per chunk (default: `chunks.fused_chunk_tokens`, an element budget of
            the chunk's logits). Any value; the last chunk may be shorter.
        sequence_parallel: hidden is sequence-sharded (above); its gradient is reduce-scattered.
            Otherwise the hidden gradient is all-reduced over tp_group.
        vocab_size: the real vocabulary when the weight carries padding rows (ids >= vocab_size
            get no probability and no gradient). None: all rows are tokens.
        with_entropy: also report the entropy (as sft_token_loss).
        gradient_accumulation_fusion: accumulate dL/dW into `weight.main_grad` when it exists
            (Megatron's `config.gradient_accumulation_fusion`); returns Megatron's dummy gradient.
        grad_in_forward: form the gradients in the forward (one GEMM fewer, holds dL/dW and
            dL/dhidden until the backward); default: recompute the logits in the backward.
        backend: "auto" (Triton on a GPU where it applies), "torch" or "triton".

    Returns:
        loss_sum: fp32 scalar, differentiable w.r.t. hidden and weight (the gradient of hidden
            is summed over tp_group; the weight's is this rank's shard).
        stats: dict of detached fp32 `[s, b]` tensors, the same as sft_token_loss returns.
    """
    rank, world_size = group_rank_and_size(tp_group)
    _validate_inputs(hidden, weight, target, loss_mask, cfg, world_size, sequence_parallel)
    padded_size = weight.size(0) * world_size
    if vocab_size is None:
        vocab_size = padded_size
    elif not 0 < vocab_size <= padded_size:
        raise ValueError(f"fused_linear_sft_loss: vocab_size {vocab_size} must lie in (0, {padded_size}] "
                         f"(the weight's ids)")
    validate_target_ids(target, cfg, vocab_size, caller="fused_linear_sft_loss")
    if chunk_size is None:
        chunk_size = chunks.fused_chunk_tokens(weight.size(0), weight.device)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fused_linear_sft_loss: chunk_size must be an integer >= 1, got {chunk_size!r}")
    kind = get_kind(cfg.kind)
    grad_enabled = torch.is_grad_enabled()
    need_weight_grad = grad_enabled and weight.requires_grad
    opts = _Options(
        cfg=cfg, tp_group=tp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
        with_entropy=with_entropy, vocab_size=vocab_size, grad_in_forward=grad_in_forward,
        accumulate_into_main_grad=gradient_accumulation_fusion and getattr(weight, "main_grad", None) is not None,
        use_triton=_use_triton(backend, kind, cfg, hidden.device),
        need_hidden_grad=grad_enabled and hidden.requires_grad, need_weight_grad=need_weight_grad,
    )
    loss_sum, *stat_values = _FusedLinearSFTLoss.apply(hidden, weight, target, loss_mask, opts)
    names = loss_math.stat_names(kind, with_entropy)
    return loss_sum, {name: value.view(target.shape) for name, value in zip(names, stat_values)}

"""The fused output-layer loss: logits = hidden @ weight.T and the SFT token loss, chunk by chunk.

    loss_sum, stats = fused_linear_sft_loss(hidden, weight, target, loss_mask, cfg, tp_group)

The same per-token loss as `sft_token_loss(hidden @ weight.T, target, cfg, tp_group)`, summed
over the loss tokens, without ever holding the `[tokens, V/tp]` logits: each chunk of tokens
gets its logits from one GEMM, its loss from the steps sft_token_loss runs (`vocab_parallel`),
and its logits are dropped. Two gradient schemes, both walking the same chunks of tokens:

- grad_in_forward=True (three GEMMs, as Liger-Kernel's fused linear cross-entropy): right after
  a chunk's loss, G = coef * d loss / d z is formed in the chunk's logits, dL/dhidden[chunk] =
  G @ W is written once (one GEMM over the whole shard, the hidden's dtype) and
  dL/dW += G^T @ hidden[chunk] is accumulated in fp32 (`_accumulate_weight_grad_`). The backward
  only scales them by the incoming gradient. Holds dL/dhidden `[t, h]` from the forward to the
  backward and, unless it goes straight into Megatron's main_grad, an fp32 `[V/tp, h]` dL/dW.
  Each chunk runs its own two collectives (its gradient needs its global sums).
- grad_in_forward=False (four GEMMs, the memory-lean form of Cut Cross-Entropy and Megatron-LM's
  own linear cross entropy): the forward keeps per token only the global max, the reduced sums
  and the gradient coefficient; the backward recomputes each chunk's logits and runs the same
  two gradient GEMMs. For the softmax-form kinds (ce, dft, sed, gem with h = linear) the
  forward takes every chunk's sums relative to the shard's own max and reduces them once: one
  all-gather and one all-reduce per call instead of two per chunk. The backward skips the tokens
  whose coefficient is 0 (prompt tokens, loss_mask = 0), whose gradient is exactly 0.

The default (`grad_in_forward=None`) is the scheme training uses on the device
(`default_grad_in_forward`, chosen by measurement: docs/PERFORMANCE.md).

Tensor parallelism: the collectives that make the loss exact are sft_token_loss's, so the global
top-k, log-sum-exp and p_target are the same. The hidden gradient is summed over the group once
(an all-reduce, as Megatron's ColumnParallelLinear does for its input) or, with
sequence_parallel=True, the input is the local sequence shard `[s/tp, b, h]`: it is
all-gathered along the sequence on the way in and its gradient reduce-scattered on the way out.

Weight gradient: with gradient_accumulation_fusion=True and a `weight.main_grad` (Megatron's DDP
buffers) it goes into main_grad, and the Function returns Megatron's dummy gradient (zeros when
the weight is shared with the embedding on the same stage, `weight.zero_out_wgrad`) with
`weight.grad_added_to_main_grad = True`, as LinearWithGradAccumulationAndAsyncCommunication does;
otherwise autograd gets it. It never needs apex: with 16-bit weights the GEMM takes 16-bit
operands and accumulates in fp32 (apex's extension where it is installed, else torch's
fp32-output GEMM on a GPU). With grad_in_forward the forward writes into main_grad before the
incoming gradient is known, so the caller states it (`output_grad_scale`: Megatron's loss scale,
1 in bf16 and fp32); a backward that brings another one is an error, never a silently wrong sum.

Backends: "torch" runs everywhere; "triton" (`triton_kernels.py`, a GPU or Triton's
interpreter) replaces each chunk's loss passes by two kernels for the softmax-form kinds; "auto"
takes Triton on a GPU where it applies.
"""

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel import gather_sequence, group_rank_and_size, reduce_scatter_sequence
from . import chunks, triton_kernels
from . import math as loss_math
from .config import LossConfig
from .kinds import TokenSums, get_kind
from .vocab_parallel import (
    local_shard_stats,
    loss_from_local_stats,
    real_columns,
    shard_loss_forward,
    validate_target_ids,
    working_buffer,
)

BACKENDS = ("auto", "torch", "triton")
SCHEMES = {"recompute": False, "grad-in-forward": True}
"""The gradient schemes by the names the flag uses (--sft-fused-mode) -> grad_in_forward."""



def default_grad_in_forward(device):
    """The scheme fused_linear_sft_loss (and training) uses by default on a device of this type.

    Measured (docs/PERFORMANCE.md): on this project's CPU the three-GEMM scheme runs at the
    materialized path's time and its peak stays within the one-chunk budget when dL/dW goes into
    main_grad; on a GPU the issue's analysis and Liger-Kernel's measurements give the same
    answer (one GEMM of four saved), not yet confirmed on a GPU here (tools/gpu_check.sh)."""
    return True


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
    output_grad_scale: object
    """A float, or a 0-dim tensor on the device (Megatron's loss scale: no host sync in the forward)."""
    use_triton: bool
    need_hidden_grad: bool
    need_weight_grad: bool


# ---------------------------------------------------------------------------------------------
# The two gradient GEMMs of a chunk


@functools.lru_cache(maxsize=None)
def _apex_wgrad_accumulate():
    """apex's fp32-accumulating weight-gradient GEMM (what Megatron's gradient-accumulation fusion calls), or None."""
    try:
        import fused_weight_gradient_mlp_cuda
    except ImportError:
        return None
    return fused_weight_gradient_mlp_cuda.wgrad_gemm_accum_fp32


@functools.lru_cache(maxsize=None)
def _torch_accumulates_16bit_into_fp32(device_type):
    """Whether torch.addmm on this device takes 16-bit operands into an fp32 accumulator in place
    (`out_dtype=torch.float32`, CUDA; which torch versions accept an fp32 input varies)."""
    if device_type != "cuda":
        return False
    acc = torch.zeros(2, 2, device=device_type)
    operand = torch.ones(2, 2, dtype=torch.bfloat16, device=device_type)
    try:
        torch.addmm(acc, operand, operand, out_dtype=torch.float32, out=acc)
    except (RuntimeError, TypeError):
        return False
    return bool(torch.all(acc == 2.0))


def _accumulate_weight_grad_(wgrad, grad, hidden):
    """wgrad `[v, h]` += G^T @ hidden for G `[c, v]`, hidden `[c, h]`: one GEMM, fp32 accumulation.

    16-bit operands into an fp32 wgrad: apex's GEMM where it is installed, else torch's GEMM with
    an fp32 output (in place where the device's torch takes it, else into an fp32 block that is
    added); on the CPU fp32 GEMMs over blocks of rows (its 16-bit GEMMs are slow, see
    `_cpu_16bit_hidden_grad`). Never an fp32 GEMM over 16-bit data on a GPU."""
    if grad.dtype == hidden.dtype == wgrad.dtype:
        wgrad.addmm_(grad.t(), hidden)
        return
    grad = grad.to(hidden.dtype)
    if not wgrad.is_cuda:
        rows = max(1, chunks.CHUNK_ELEMENTS // max(grad.size(0), hidden.size(1)))
        hidden32 = hidden.float()
        for start in range(0, wgrad.size(0), rows):
            block = slice(start, start + rows)
            wgrad[block].addmm_(grad[:, block].t().float(), hidden32)
        return
    apex = _apex_wgrad_accumulate()
    if apex is not None and wgrad.dtype == torch.float32:
        apex(hidden.contiguous(), grad.contiguous(), wgrad)
        return
    if _torch_accumulates_16bit_into_fp32(wgrad.device.type):
        torch.addmm(wgrad, grad.t(), hidden, out_dtype=torch.float32, out=wgrad)
        return
    rows = max(1, chunks.CHUNK_ELEMENTS // hidden.size(1))
    for start in range(0, wgrad.size(0), rows):
        block = slice(start, start + rows)
        wgrad[block].add_(torch.mm(grad[:, block].t(), hidden, out_dtype=torch.float32))


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


def _gradient_gemms(grad, hidden_rows, weight, grad_hidden_rows, wgrad):
    """One chunk's G `[c, V/tp]`: grad_hidden_rows = G @ W (written once, its dtype) and wgrad += G^T @ hidden_rows."""
    grad = grad.to(weight.dtype)  # the 16-bit G Megatron's output layer would get: one cast for both GEMMs
    if grad_hidden_rows is not None:
        if not weight.is_cuda and weight.dtype in (torch.bfloat16, torch.float16):
            _cpu_16bit_hidden_grad(grad, weight, grad_hidden_rows)
        else:  # the output layer's backward GEMM
            torch.matmul(grad, weight, out=grad_hidden_rows)
    if wgrad is not None:
        _accumulate_weight_grad_(wgrad, grad, hidden_rows)


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


# ---------------------------------------------------------------------------------------------
# One chunk's loss, and its gradient in place


@dataclass
class _ChunkLoss:
    """One chunk's loss results `[c]` and what forming its gradient needs."""

    kept: torch.Tensor | None
    """The torch path's fp32 kept buffer `[c, V/tp]` (None: the Triton path's logits are used)."""
    index: torch.Tensor
    in_shard: torch.Tensor
    logits_max: torch.Tensor
    sums: TokenSums
    kind_loss: object
    stat_values: tuple


def _local_stats(logits, index, in_shard, opts: _Options, kind, real):
    """One chunk's LocalStats (no collective): the Triton kernel, or its torch twin (consumes fp32 logits)."""
    if opts.use_triton:
        return triton_kernels.local_shard_stats(logits, index, in_shard, real, min(opts.cfg.top_k, logits.size(-1)),
                                                opts.with_entropy, kind.temperature(opts.cfg))
    return local_shard_stats(logits, index, in_shard, real, kind, opts.cfg, opts.with_entropy)


def _concat_local_stats(parts):
    """The LocalStats of consecutive chunks -> those of all their tokens."""
    def concat(values):
        if values[0] is None:
            return None
        if isinstance(values[0], tuple):
            return tuple(torch.cat(column) for column in zip(*values))
        return torch.cat(values)

    return loss_math.LocalStats(*(concat(field) for field in zip(*parts)))


def _chunk_loss(logits, target, opts: _Options, kind, rank, world_size, real) -> _ChunkLoss:
    """The loss of one chunk from its logits `[c, V/tp]`, with its own two collectives."""
    if opts.use_triton:
        shard_size = logits.size(-1)
        index, in_shard = loss_math.shard_target_index(target, rank * shard_size, (rank + 1) * shard_size)
        stats = _local_stats(logits, index, in_shard, opts, kind, real)
        logits_max, sums, kind_loss, stat_values = loss_from_local_stats(stats, target, kind, opts.cfg, opts.tp_group,
                                                                         world_size, opts.with_entropy)
        return _ChunkLoss(None, index, in_shard, logits_max, sums, kind_loss, stat_values)
    result = shard_loss_forward(logits, target, opts.cfg, opts.tp_group, True, opts.with_entropy, opts.vocab_size)
    return _ChunkLoss(result.buffer, result.index, result.in_shard, result.logits_max, result.sums, result.kind_loss,
                      result.stat_values)


def _normalizer(kind, cfg, sums: TokenSums):
    """The sum the softmax form divides by: sum_j exp(x_j), or the tempered sum for T != 1."""
    return sums.sum_exp if kind.temperature(cfg) == 1.0 else sums.extra[0]


def _form_gradient_(logits, kept, opts: _Options, kind, sums: TokenSums, logits_max, coef, index, in_shard, real):
    """coef * d loss / d z for one chunk, in place: in the logits (Triton, their dtype), in the kept
    buffer of the forward, or (kept None) in the recomputed logits (torch: an fp32 buffer)."""
    if opts.use_triton:
        return triton_kernels.write_gradient_(logits, logits_max, coef / _normalizer(kind, opts.cfg, sums),
                                              coef * in_shard, index, real, kind.temperature(opts.cfg))
    if kept is None:
        kept = loss_math.keep_from_logits_(working_buffer(logits, inplace=True), logits_max, real, kind, opts.cfg)
    return kind.gradient_(opts.cfg, kept, sums, coef, index, in_shard)


# ---------------------------------------------------------------------------------------------
# The autograd Function


class _FusedLinearSFTLoss(torch.autograd.Function):
    """hidden `[s(/tp), b, h]`, weight `[V/tp, h]`, target and loss_mask `[s, b]` -> loss sum and the stats `[t]`."""

    @staticmethod
    def forward(ctx, hidden, weight, target, loss_mask, opts: _Options):
        rank, world_size = group_rank_and_size(opts.tp_group)
        total = gather_sequence(hidden, opts.tp_group) if opts.sequence_parallel and world_size > 1 \
            else hidden
        flat_hidden = total.reshape(-1, total.size(-1))  # [t, h]
        flat_target = target.reshape(-1)  # [t]
        mask = loss_mask.reshape(-1).to(torch.float32)  # [t]
        kind = get_kind(opts.cfg.kind)
        real = real_columns(opts.vocab_size, rank * weight.size(0), weight.size(0))
        need_grad = opts.need_hidden_grad or opts.need_weight_grad
        main_grad = weight.main_grad if opts.accumulate_into_main_grad and opts.need_weight_grad else None
        ctx.opts, ctx.hidden_shape, ctx.num_tokens, ctx.weight_dtype = opts, hidden.shape, flat_target.numel(), \
            weight.dtype
        # Like Megatron's linear layer: main_grad lives on ctx (not saved: the buffer is
        # updated in place), and so does the weight whose grad_added_to_main_grad is set.
        ctx.main_grad, ctx.main_grad_weight = main_grad, (weight if main_grad is not None else None)

        if need_grad and opts.grad_in_forward:
            token_loss, stats, grad_hidden, wgrad = _grad_in_forward(flat_hidden, weight, flat_target, mask, main_grad,
                                                                     opts, kind, rank, world_size, real)
            ctx.save_for_backward(grad_hidden, None if main_grad is not None else wgrad)
        else:
            token_loss, stats, per_token = _loss_in_chunks(flat_hidden, weight, flat_target, mask, opts, kind, rank,
                                                           world_size, real, keep=need_grad)
            if need_grad:
                ctx.real = real
                ctx.save_for_backward(hidden, weight, flat_target, per_token)
        loss_sum = (token_loss * mask).sum()
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
            if ctx.main_grad is not None:
                # main_grad already holds this call's gradient at output_grad_scale: the incoming
                # gradient must be that scale (one host sync per call).
                expected = float(opts.output_grad_scale)
                if float(scale) != expected:
                    raise RuntimeError(
                        f"fused_linear_sft_loss: the loss sum's gradient is {float(scale)!r}, but its weight gradient "
                        f"went into main_grad in the forward for output_grad_scale={expected!r}; pass the loss "
                        f"scale as output_grad_scale, or grad_in_forward=False")
            else:
                if grad_hidden is not None:
                    grad_hidden.mul_(scale.to(grad_hidden.dtype))
                if wgrad is not None:
                    wgrad.mul_(scale)
        else:
            grad_hidden, wgrad = _recompute_gradients(ctx, scale, rank, world_size)

        if grad_hidden is not None:
            total_shape = (ctx.hidden_shape[0] * (world_size if opts.sequence_parallel else 1), *ctx.hidden_shape[1:])
            grad_hidden = grad_hidden.view(total_shape)
            if world_size > 1 and opts.sequence_parallel:
                grad_hidden = reduce_scatter_sequence(grad_hidden, opts.tp_group)
            elif world_size > 1:
                dist.all_reduce(grad_hidden, group=opts.tp_group)
        grad_weight = None
        if opts.need_weight_grad:
            if ctx.main_grad is not None:
                grad_weight = _megatron_dummy_weight_grad(ctx.main_grad_weight, ctx.main_grad)
            else:
                grad_weight = wgrad.to(ctx.weight_dtype)
        return grad_hidden, grad_weight, None, None, None


def _token_slices(num_tokens, chunk_size):
    return [slice(start, min(start + chunk_size, num_tokens)) for start in range(0, num_tokens, chunk_size)]


def _stat_buffers(kind, opts, num_tokens, device):
    names = loss_math.stat_names(kind, opts.with_entropy)
    return (torch.empty(num_tokens, dtype=torch.float32, device=device),
            torch.empty(len(names), num_tokens, dtype=torch.float32, device=device))


def _grad_in_forward(flat_hidden, weight, flat_target, mask, main_grad, opts: _Options, kind, rank, world_size, real):
    """The three-GEMM scheme: each chunk's loss, then its gradient and both gradient GEMMs at once.

    Returns (token loss `[t]`, stats `[n, t]`, dL/dhidden `[t, h]` or None, dL/dW accumulator or None).
    Into main_grad the gradient goes at output_grad_scale, else at scale 1 (the backward scales)."""
    num_tokens = flat_target.numel()
    token_loss, stats = _stat_buffers(kind, opts, num_tokens, flat_hidden.device)
    grad_hidden = torch.empty_like(flat_hidden) if opts.need_hidden_grad else None  # written once per chunk
    wgrad = _weight_grad_accumulator(weight, main_grad) if opts.need_weight_grad else None
    coef_scale = opts.output_grad_scale if main_grad is not None else 1.0
    scaled = torch.is_tensor(coef_scale) or coef_scale != 1.0
    for rows in _token_slices(num_tokens, opts.chunk_size):
        logits = flat_hidden[rows] @ weight.t()  # [c, V/tp], the output layer's dtype
        chunk = _chunk_loss(logits, flat_target[rows], opts, kind, rank, world_size, real)
        if not opts.use_triton:
            logits = None  # fp32: it is the kept buffer; 16-bit: the buffer is an fp32 copy
        token_loss[rows] = chunk.kind_loss.loss
        stats[:, rows] = torch.stack(chunk.stat_values)
        coef = mask[rows] * chunk.kind_loss.grad_scale
        if scaled:
            coef = coef * coef_scale
        grad = _form_gradient_(logits, chunk.kept, opts, kind, chunk.sums, chunk.logits_max, coef, chunk.index,
                               chunk.in_shard, real)
        logits = chunk = None  # the chunk's logits (Triton) or kept buffer now hold the gradient
        _gradient_gemms(grad, flat_hidden[rows], weight, None if grad_hidden is None else grad_hidden[rows], wgrad)
        del grad
    return token_loss, stats, grad_hidden, wgrad


def _loss_in_chunks(flat_hidden, weight, flat_target, mask, opts: _Options, kind, rank, world_size, real, keep):
    """The loss only, chunk by chunk (the recompute scheme's forward, and every call without gradients).

    A softmax-form kind takes every chunk's sums relative to the shard's own max and reduces them
    once (one all-gather, one all-reduce per call); another form runs both collectives per chunk.
    Returns (token loss `[t]`, stats `[n, t]`, and with keep the per-token results the recompute
    needs, `[4 + n', t]`: global max, sum_exp, x_y, coefficient (loss_mask x the kind's
    grad_scale), the kind's extra sums)."""
    num_tokens = flat_target.numel()
    slices = _token_slices(num_tokens, opts.chunk_size)
    if kind.temperature(opts.cfg) is not None:
        shard_size = weight.size(0)
        index, in_shard = loss_math.shard_target_index(flat_target, rank * shard_size, (rank + 1) * shard_size)
        parts = []
        for rows in slices:
            logits = flat_hidden[rows] @ weight.t()  # [c, V/tp]
            parts.append(_local_stats(logits, index[rows], in_shard[rows], opts, kind, real))
            del logits
        logits_max, sums, kind_loss, stat_values = loss_from_local_stats(
            _concat_local_stats(parts), flat_target, kind, opts.cfg, opts.tp_group, world_size, opts.with_entropy)
        token_loss, stats, grad_scale = kind_loss.loss, torch.stack(stat_values), kind_loss.grad_scale
    else:
        token_loss, stats = _stat_buffers(kind, opts, num_tokens, flat_hidden.device)
        per_token = torch.empty(4 + len(kind.sum_names(opts.cfg)), num_tokens, dtype=torch.float32,
                                device=flat_hidden.device)
        logits_max, grad_scale = per_token[0], per_token[3]
        sums = TokenSums(per_token[1], per_token[2], per_token[4:])
        for rows in slices:
            logits = flat_hidden[rows] @ weight.t()
            result = shard_loss_forward(logits, flat_target[rows], opts.cfg, opts.tp_group, True, opts.with_entropy,
                                        opts.vocab_size)
            del logits
            token_loss[rows], stats[:, rows] = result.kind_loss.loss, torch.stack(result.stat_values)
            logits_max[rows], grad_scale[rows] = result.logits_max, result.kind_loss.grad_scale
            sums.sum_exp[rows], sums.target_logit[rows] = result.sums.sum_exp, result.sums.target_logit
            sums.extra[:, rows] = result.sums.extra
            del result
    if not keep:
        return token_loss, stats, None
    coef = mask * grad_scale
    return token_loss, stats, torch.cat([torch.stack([logits_max, sums.sum_exp, sums.target_logit, coef]), sums.extra])


def _recompute_gradients(ctx, scale, rank, world_size):
    """The recompute scheme's backward, chunk by chunk of the tokens that carry a gradient.

    -> (dL/dhidden `[t, h]` or None, the dL/dW accumulator or None (main_grad: already added))."""
    opts: _Options = ctx.opts
    hidden, weight, flat_target, per_token = ctx.saved_tensors
    total = gather_sequence(hidden, opts.tp_group) if opts.sequence_parallel and world_size > 1 \
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

    grad_hidden = torch.empty_like(flat_hidden) if opts.need_hidden_grad else None
    wgrad = _weight_grad_accumulator(weight, ctx.main_grad) if opts.need_weight_grad else None
    for rows in _token_slices(active.numel(), opts.chunk_size):
        logits = flat_hidden[rows] @ weight.t()  # [c, V/tp], recomputed
        chunk_sums = TokenSums(sums.sum_exp[rows], sums.target_logit[rows], sums.extra[:, rows])
        grad = _form_gradient_(logits, None, opts, kind, chunk_sums, logits_max[rows], coef[rows], index[rows],
                               in_shard[rows], ctx.real)
        del logits
        _gradient_gemms(grad, flat_hidden[rows], weight, None if grad_hidden is None else grad_hidden[rows], wgrad)
        del grad
    if grad_hidden is not None and not everything:
        grad_hidden = grad_hidden.new_zeros((ctx.num_tokens, grad_hidden.size(-1))).index_copy_(0, active, grad_hidden)
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
                             f"with these settings (a gradient of its own form); use backend='torch' or 'auto'")
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
                          gradient_accumulation_fusion=False, grad_in_forward=None, output_grad_scale=1.0,
                          backend="auto"):
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
            the chunk's logits per device type and scheme). Any value; the last chunk may be shorter.
        sequence_parallel: hidden is sequence-sharded (above); its gradient is reduce-scattered.
            Otherwise the hidden gradient is all-reduced over tp_group.
        vocab_size: the real vocabulary when the weight carries padding rows (ids >= vocab_size
            get no probability and no gradient). None: all rows are tokens.
        with_entropy: also report the entropy (as sft_token_loss).
        gradient_accumulation_fusion: accumulate dL/dW into `weight.main_grad` when it exists
            (Megatron's DDP buffers); returns Megatron's dummy gradient. No apex needed.
        grad_in_forward: True: the three-GEMM scheme (gradients formed in the forward); False: the
            logits recomputed in the backward (four GEMMs, the least memory); None: the device's
            default (`default_grad_in_forward`), which training uses too.
        output_grad_scale: the gradient the loss sum will receive (Megatron's loss scale; a float
            or a 0-dim tensor); read only when grad_in_forward writes into main_grad in the forward.
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
    if grad_in_forward is None:
        grad_in_forward = default_grad_in_forward(weight.device)
    if chunk_size is None:
        chunk_size = chunks.fused_chunk_tokens(weight.size(0), weight.device, grad_in_forward)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"fused_linear_sft_loss: chunk_size must be an integer >= 1, got {chunk_size!r}")
    kind = get_kind(cfg.kind)
    grad_enabled = torch.is_grad_enabled()
    opts = _Options(
        cfg=cfg, tp_group=tp_group, sequence_parallel=sequence_parallel, chunk_size=chunk_size,
        with_entropy=with_entropy, vocab_size=vocab_size, grad_in_forward=bool(grad_in_forward),
        accumulate_into_main_grad=gradient_accumulation_fusion and getattr(weight, "main_grad", None) is not None,
        output_grad_scale=output_grad_scale if torch.is_tensor(output_grad_scale) else float(output_grad_scale),
        use_triton=_use_triton(backend, kind, cfg, hidden.device),
        need_hidden_grad=grad_enabled and hidden.requires_grad, need_weight_grad=grad_enabled and weight.requires_grad,
    )
    loss_sum, *stat_values = _FusedLinearSFTLoss.apply(hidden, weight, target, loss_mask, opts)
    names = loss_math.stat_names(kind, with_entropy)
    return loss_sum, {name: value.view(target.shape) for name, value in zip(names, stat_values)}

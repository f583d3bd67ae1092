"""Triton kernels of the fused output-layer loss: two passes over one chunk of logits `[c, V/tp]`.

    TRITON_INTERPRET=1 python -m pytest tests/loss/test_fused_linear.py -k triton   # on the CPU

1. `local_shard_stats`: one read of every logit of the chunk gives, per token, this shard's
   max m_l, sum_j exp(z_j - m_l) (online: the running sum is rescaled whenever the max
   grows), sum_j exp(z_j - m_l) (z_j - m_l) (the entropy's, when asked for), the k largest
   logits (candidates of the global top-k) and the target's logit. The caller all-gathers the
   candidates and the target logit, takes the global max m, rescales the sums to it
   (`math.rescale_partial_sums`) and all-reduces them, exactly as the PyTorch path does.
2. `write_gradient_`: a second read of the chunk writes coef * (softmax(z) - onehot(y)) in place,
   in the logits' dtype (no fp32 buffer of the chunk), ready for the two GEMMs of the backward.

They cover the kinds whose gradient is the CE form times one number per token and that need no
extra sums (ce, dft, sed; `supports(kind, cfg)`); GEM keeps the PyTorch chunk math.

Importing this module never imports Triton and never fails: `HAVE_TRITON` only says whether it
is installed; Triton is imported and the kernels defined on first use (`_kernels()`). Triton
reads TRITON_INTERPRET=1 (its interpreter, which runs the kernels on CPU tensors) when it is
first imported, so set it before the process imports Triton (the tests set it in the
processes they spawn).
"""

import functools
import importlib.util
import os

import torch

HAVE_TRITON = importlib.util.find_spec("triton") is not None
"""Triton is installed (the kernels may still need a GPU or the interpreter: `available`)."""
triton = tl = None  # imported by _kernels()

BLOCK_COLUMNS = 2048
"""Columns one program reads per step (a power of two); read at each call, so tests may lower it."""


def interpreting():
    return os.environ.get("TRITON_INTERPRET") == "1"


def available(device):
    """Whether the kernels can run on tensors of `device`: a GPU with Triton, or Triton's interpreter."""
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


def supports(kind, cfg):
    """The kernels compute the default gradient form (CE form times a per-token scale) and only sum_j exp."""
    from .kinds import LossKind

    return type(kind).gradient_ is LossKind.gradient_ and not kind.sum_names(cfg)


@functools.lru_cache(maxsize=None)
def _kernels():
    """Import Triton and define the kernels (compiled at their first launch); module globals, as Triton wants."""
    global triton, tl
    import triton
    import triton.language as tl

    @triton.jit
    def local_stats_kernel(logits_ptr, row_stride, real, index_ptr, in_shard_ptr,
                           max_ptr, sum_ptr, dot_ptr, topk_ptr, target_ptr,
                           COUNT: tl.constexpr, COUNT_POW2: tl.constexpr, BLOCK: tl.constexpr,
                           WITH_ENTROPY: tl.constexpr):
        row = tl.program_id(0)
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        index = tl.load(index_ptr + row)
        columns = tl.arange(0, BLOCK)
        slots = tl.arange(0, COUNT_POW2)
        running_max = float("-inf")
        sum_exp = 0.0
        sum_exp_x = 0.0
        target_logit = 0.0
        best = tl.full([COUNT_POW2], float("-inf"), tl.float32)  # the k largest so far, descending
        for start in range(0, real, BLOCK):
            column = start + columns
            inside = column < real  # padding ids (>= vocab_size) are not read: no probability
            values = tl.load(row_ptr + column, mask=inside, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(running_max, tl.max(values, axis=0))
            # Every step reads at least one real logit, so new_max is finite; the first step's
            # old max is -inf, where the shift is 0 (its sums are still 0).
            shift = tl.where(running_max == float("-inf"), 0.0, running_max - new_max)
            rescale = tl.exp(shift)
            shifted = values - new_max
            exp_shifted = tl.where(inside, tl.exp(shifted), 0.0)
            if WITH_ENTROPY:
                # sum e^(z - m') (z - m') = e^d (sum e^(z - m) (z - m) + d sum e^(z - m)), d = m - m'
                sum_exp_x = rescale * (sum_exp_x + shift * sum_exp) + tl.sum(
                    tl.where(inside, exp_shifted * shifted, 0.0), axis=0)
            sum_exp = rescale * sum_exp + tl.sum(exp_shifted, axis=0)
            running_max = new_max
            target_logit += tl.sum(tl.where(column == index, values, 0.0), axis=0)
            # Merge this step's values into the k best: k times, take the larger head and drop
            # that one element (ties are kept: equal values count once each, as in torch.topk).
            merged = tl.full([COUNT_POW2], float("-inf"), tl.float32)
            for slot in tl.static_range(COUNT):
                best_head = tl.max(best, axis=0)
                values_head = tl.max(values, axis=0)
                from_best = best_head >= values_head
                merged = tl.where(slots == slot, tl.where(from_best, best_head, values_head), merged)
                best = tl.where(slots == tl.argmax(best, axis=0), tl.where(from_best, float("-inf"), best), best)
                values = tl.where(columns == tl.argmax(values, axis=0),
                                  tl.where(from_best, values, float("-inf")), values)
            best = merged
        in_shard = tl.load(in_shard_ptr + row) != 0
        tl.store(max_ptr + row, running_max)
        tl.store(sum_ptr + row, sum_exp)
        if WITH_ENTROPY:
            tl.store(dot_ptr + row, sum_exp_x)
        tl.store(topk_ptr + row * COUNT + slots, best, mask=slots < COUNT)
        tl.store(target_ptr + row, tl.where(in_shard, target_logit, 0.0))

    @triton.jit
    def gradient_kernel(logits_ptr, row_stride, real, num_columns, max_ptr, scale_ptr, target_coef_ptr, index_ptr,
                        BLOCK: tl.constexpr):
        row = tl.program_id(0)
        start = tl.program_id(1) * BLOCK
        row_ptr = logits_ptr + row.to(tl.int64) * row_stride
        column = start + tl.arange(0, BLOCK)
        present = column < num_columns
        values = tl.load(row_ptr + column, mask=present, other=0.0).to(tl.float32)
        logits_max = tl.load(max_ptr + row)
        scale = tl.load(scale_ptr + row)
        target_coef = tl.load(target_coef_ptr + row)
        index = tl.load(index_ptr + row)
        grad = tl.where(column < real, tl.exp(values - logits_max) * scale, 0.0)
        grad = tl.where(column == index, grad - target_coef, grad)
        tl.store(row_ptr + column, grad.to(logits_ptr.dtype.element_ty), mask=present)

    return local_stats_kernel, gradient_kernel


def _block(num_columns):
    return max(16, min(BLOCK_COLUMNS, triton.next_power_of_2(max(1, num_columns))))


def local_shard_stats(logits, index, in_shard, real, count, with_entropy):
    """One pass over this shard's logits `[c, V/tp]` (rows contiguous, any float dtype).

    index `[c]` int64 and in_shard `[c]` bool locate the target (`math.shard_target_index`);
    real: the columns that are tokens (the rest is padding); count = min(k, V/tp) candidates.
    Returns fp32 tensors: local max m_l `[c]`, sum_j exp(z_j - m_l) `[c]`, the entropy's
    sum_j exp(z_j - m_l) (z_j - m_l) `[c]` (None unless with_entropy), the top-count logits
    `[c, count]` (-inf where the shard has fewer real ids) and the target's logit `[c]` (0 where
    absent). With no real column m_l is -inf and both sums are 0.
    """
    local_stats_kernel, _ = _kernels()
    rows = logits.size(0)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    device = logits.device
    local_max = torch.empty(rows, dtype=torch.float32, device=device)
    sum_exp = torch.empty(rows, dtype=torch.float32, device=device)
    sum_exp_x = torch.empty(rows, dtype=torch.float32, device=device) if with_entropy else sum_exp
    candidates = torch.empty(rows, count, dtype=torch.float32, device=device)
    target_logit = torch.empty(rows, dtype=torch.float32, device=device)
    if rows:
        local_stats_kernel[(rows,)](
            logits, logits.stride(0), real, index.contiguous(), in_shard.to(torch.int8),
            local_max, sum_exp, sum_exp_x, candidates, target_logit,
            COUNT=count, COUNT_POW2=triton.next_power_of_2(count), BLOCK=_block(real),
            WITH_ENTROPY=with_entropy,
        )
    return local_max, sum_exp, (sum_exp_x if with_entropy else None), candidates, target_logit


def write_gradient_(logits, logits_max, scale, target_coef, index, real):
    """In place: logits `[c, V/tp]` -> scale * exp(z - m) - target_coef * onehot(y), 0 at padding ids.

    logits_max `[c]` is the global max m; scale = coef / sum_j exp(z_j - m) and target_coef =
    coef where the target lies in this shard (else 0), all fp32 `[c]`. The result keeps the
    logits' dtype. Returns logits.
    """
    _, gradient_kernel = _kernels()
    rows, num_columns = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("write_gradient_: the logits' rows must be contiguous")
    if rows:
        block = _block(num_columns)
        gradient_kernel[(rows, triton.cdiv(num_columns, block))](
            logits, logits.stride(0), real, num_columns, logits_max.contiguous(), scale.contiguous(),
            target_coef.contiguous(), index.contiguous(), BLOCK=block,
        )
    return logits

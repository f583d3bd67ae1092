"""Packed rows: no cross-sample attention or targets; the same per-sample losses and gradients as unpacked."""

import torch

from sed_megatron.data.packing import pack_greedy, packed_sample
from sed_megatron.data.simple import sample_from_tokens
from sed_megatron.loss import (
    IGNORE_INDEX,
    LossConfig,
    masked_sum_and_count,
    sft_token_loss,
)
from sed_megatron.testing.models import tiny_gpt

from ..distributed import run_distributed

VOCAB, SEQ = 96, 24


def _to_thd(batch):
    """Rows [b, s] -> one packed sequence [1, b*s] and its PackedSeqParams, as get_batch makes them at CP=1."""
    from sed_megatron.training.batch import (
        flatten_batch_for_packed_sequences,
        packed_seq_params,
    )

    batch = flatten_batch_for_packed_sequences(dict(batch))
    return {**batch, "packed_seq_params": packed_seq_params(batch)}


def make_samples():
    gen = torch.Generator().manual_seed(7)
    samples = []
    for length, prompt in ((7, 3), (5, 2), (10, 4)):
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        samples.append((ids, [0] * prompt + [1] * (length - prompt)))
    return samples


def test_pack_greedy_keeps_order_and_limits():
    assert pack_greedy([7, 5, 10, 20, 3], seq_length=20) == [[0, 1, 2], [3], [4]]


def test_packed_row_layout():
    row = packed_sample(make_samples(), SEQ)
    assert row["position_ids"][:6].tolist() == list(range(6)) and row["position_ids"][6:10].tolist() == list(range(4))
    assert row["labels"][5].item() != IGNORE_INDEX and row["labels"][19:].tolist() == [IGNORE_INDEX] * 5
    mask = row["attention_mask"][0]
    assert mask[6, 5] and not mask[7, 6] and mask[6, 7]  # 2nd sample: blind to the 1st and to the future
    assert row["loss_mask"].sum().item() == (7 - 3) + (5 - 2) + (10 - 4)


def per_sample_losses_and_grads(model, packed, cfg):
    model.zero_grad()
    if packed:
        row = packed_sample(make_samples(), SEQ)
        batch = {key: value.unsqueeze(0) for key, value in row.items()}
        logits = model(batch["tokens"], batch["position_ids"], batch["attention_mask"])
        loss, _ = sft_token_loss(logits, batch["labels"], cfg)
        sums, start = [], 0
        for ids, _ in make_samples():
            end = start + len(ids) - 1
            sums.append(masked_sum_and_count(loss[:, start:end], batch["loss_mask"][:, start:end])[0])
            start = end
    else:
        sums = []
        for ids, mask in make_samples():
            n = len(ids) - 1
            sample = {key: value.unsqueeze(0) for key, value in sample_from_tokens(ids, mask, n).items()}
            causal = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
            logits = model(sample["tokens"], sample["position_ids"], causal)
            loss, _ = sft_token_loss(logits, sample["labels"], cfg)
            sums.append(masked_sum_and_count(loss, sample["loss_mask"])[0])
    torch.stack(sums).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return torch.stack(sums).detach(), grads


def check_packed_equals_unpacked():
    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=SEQ)
    cfg = LossConfig(kind="sed", tau=0.05, top_k=2)
    packed_losses, packed_grads = per_sample_losses_and_grads(model, True, cfg)
    losses, grads = per_sample_losses_and_grads(model, False, cfg)
    # RoPE rotates the packed samples by a different absolute angle (same relative angles):
    # fp32 rounding only, ~1e-7 relative.
    torch.testing.assert_close(packed_losses, losses, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_equals_unpacked():
    run_distributed(check_packed_equals_unpacked, world_size=1)


THD_ROWS = [[(list(range(1, 6)), [0, 0, 1, 1, 1]), (list(range(7, 14)), [0] * 3 + [1] * 4)],  # 4 + 6, padding 6
            [(list(range(2, 19)), [0] * 5 + [1] * 12)]]  # exactly full: no padding segment


def _thd_attention(q, k, v, cu_seqlens):
    """Reference packed-sequence attention: causal softmax attention inside each segment. q,k,v [t, d]."""
    out = torch.empty_like(q)
    for a, b in zip(cu_seqlens[:-1].tolist(), cu_seqlens[1:].tolist()):
        scores = q[a:b] @ k[a:b].T
        scores = scores.masked_fill(torch.triu(torch.ones(b - a, b - a, dtype=torch.bool), 1), float("-inf"))
        out[a:b] = scores.softmax(-1) @ v[a:b]
    return out


def test_thd_rows_describe_the_same_attention_as_the_block_mask():
    """cu_seqlens (TE's packed-sequence path) and the block-diagonal mask (local path) agree.

    Two rows are collated as the data loader does and flattened into one sequence the way
    forward_step hands it to Transformer Engine. Attention computed segment by segment from
    the merged cu_seqlens must equal dense attention under each row's mask. RoPE positions
    that restart at every segment must equal the rows' position ids on the sample tokens."""
    seq_length = 16
    masked = [packed_sample(r, seq_length) for r in THD_ROWS]
    thd = [packed_sample(r, seq_length, thd=True) for r in THD_ROWS]
    assert thd[0]["cu_seqlens"].tolist()[:4] == [0, 4, 10, 16] and thd[0]["max_seqlen"].item() == 6
    assert thd[1]["cu_seqlens"].tolist()[:2] == [0, 16] and "attention_mask" not in thd[0]
    for key in ("tokens", "labels", "loss_mask", "position_ids"):
        assert all(torch.equal(t[key], m[key]) for t, m in zip(thd, masked))

    flat = _to_thd(_thd_batch(seq_length))
    params = flat["packed_seq_params"]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 4, 10, 16, 32]
    assert params.max_seqlen_q == 16 and flat["tokens"].shape == (1, 2 * seq_length)

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, seq_length, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    packed = _thd_attention(q.reshape(-1, 8), k.reshape(-1, 8), v.reshape(-1, 8), params.cu_seqlens_q)
    for r, row in enumerate(masked):
        scores = (q[r] @ k[r].T).masked_fill(row["attention_mask"][0], float("-inf"))
        dense = scores.softmax(-1) @ v[r]
        real = row["labels"] != IGNORE_INDEX  # the padding tail differs (self only vs causal) and has no loss
        torch.testing.assert_close(packed.reshape(2, seq_length, 8)[r][real], dense[real], rtol=0, atol=1e-12)

    cu = params.cu_seqlens_q.tolist()
    restarted = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1], cu[1:])])
    on_samples = flat["labels"].reshape(-1) != IGNORE_INDEX
    assert torch.equal(restarted[on_samples], flat["position_ids"].reshape(-1)[on_samples])


def _thd_batch(seq_length=16):
    samples = [packed_sample(r, seq_length, thd=True) for r in THD_ROWS]
    return {key: torch.stack([s[key] for s in samples]) for key in samples[0]}


def check_thd_batch_reaches_every_stage(seq_length):
    """forward_step on every rank: TP rank 0 of each stage reads, the others get the broadcast."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    from sed_megatron.training.batch import BatchSpec
    from sed_megatron.training.step import StepConfig, forward_step

    cfg = StepConfig(loss=LossConfig(kind="ce"),
                     batch=BatchSpec(micro_batch_size=2, seq_length=seq_length, create_attention_mask=False,
                                     packed_thd=True))
    expected = _thd_batch(seq_length)
    calls = []

    class Model:  # records what the model chunk is called with
        pg_collection = ProcessGroupCollection.use_mpu_process_groups()

        def __call__(self, tokens, position_ids, attention_mask, packed_seq_params=None):
            calls.append((tokens, position_ids, attention_mask, packed_seq_params))
            return torch.zeros(1)

    first = parallel_state.is_pipeline_first_stage()
    last = parallel_state.is_pipeline_last_stage()
    data = iter([_thd_batch(seq_length)]) if parallel_state.get_tensor_model_parallel_rank() == 0 else None
    _, loss_fn = forward_step(cfg, data, Model())
    tokens, position_ids, attention_mask, params = calls[0]
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 4, 10, 16, 32]
    assert params.cu_seqlens_kv.tolist() == [0, 4, 10, 16, 32] and params.max_seqlen_q == 16
    assert attention_mask is None
    if first:
        assert torch.equal(tokens, expected["tokens"].reshape(1, -1))
        assert torch.equal(position_ids, expected["position_ids"].reshape(1, -1))
    else:
        assert tokens is None and position_ids is None
    labels, loss_mask = loss_fn.args[2:4]
    if last:
        assert torch.equal(labels, expected["labels"].reshape(1, -1))
        assert torch.equal(loss_mask, expected["loss_mask"].reshape(1, -1))


def test_thd_batch_reaches_every_stage():
    """The Transformer Engine packing path through Megatron's batch broadcast: TP=2 x PP=2, and PP=4
    (middle stages need the boundaries too). TE's attention itself needs a GPU; see README."""
    run_distributed(check_thd_batch_reaches_every_stage, world_size=4, tp=2, pp=2, args=(16,))
    run_distributed(check_thd_batch_reaches_every_stage, world_size=4, tp=1, pp=4, args=(16,))


def test_cp_packing_pads_every_sample_to_2cp():
    row = packed_sample(make_samples(), SEQ, thd=True, cp_size=2)  # 6, 4, 9 positions -> 8, 4, 12
    assert row["cu_seqlens"].tolist()[:5] == [0, 8, 12, 24, 24] and row["max_seqlen"].item() == 12
    assert torch.equal(row["cu_seqlens_padded"], row["cu_seqlens"])
    assert row["labels"][6:8].tolist() == [IGNORE_INDEX] * 2 and row["loss_mask"][6:8].sum() == 0
    assert row["position_ids"][:12].tolist() == list(range(8)) + list(range(4))  # padding continues the positions
    assert row["loss_mask"].sum().item() == (7 - 3) + (5 - 2) + (10 - 4)
    assert pack_greedy([7, 5, 10], SEQ, multiple=4) == [[0, 1, 2]] and pack_greedy([7, 5, 14], SEQ, 4) == [[0, 1], [2]]


def _cp_loss_and_grads(model, rows, spec, cfg):
    """Sum of the loss over every sample and the parameter gradients, both summed over the CP group
    (what DDP and Megatron's loop add up), with each row through the batch pipeline's CP slice."""
    import torch.distributed as dist
    from megatron.core.process_groups_config import ProcessGroupCollection

    from sed_megatron.training.batch import get_batch
    from sed_megatron.training.step import model_forward

    groups = ProcessGroupCollection.use_mpu_process_groups()
    model.zero_grad()
    total = torch.zeros(())
    for row in rows:
        batch = get_batch(iter([{key: value.unsqueeze(0) for key, value in row.items()}]), spec, groups)
        assert batch["tokens"].shape[1] == spec.seq_length // 2  # this rank's half of the row
        loss, _ = sft_token_loss(model_forward(model, batch), batch["labels"], cfg)
        total = total + masked_sum_and_count(loss, batch["loss_mask"])[0]
    total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for tensor in [total.detach(), *grads.values()]:
        dist.all_reduce(tensor, group=groups.cp)
    return total.detach(), grads


def check_packed_equals_unpacked_under_cp():
    """CP=2, local layers: one packed THD row (samples padded to 2 x CP, per-sample chunks) gives
    the loss and gradients of the same samples unpacked (per-row chunks), through get_batch."""
    from megatron.core import tensor_parallel

    from sed_megatron.models import build_gpt_model
    from sed_megatron.testing.models import tiny_model_config
    from sed_megatron.training.batch import BatchSpec

    model_cfg = tiny_model_config(VOCAB, SEQ)
    torch.manual_seed(1234)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    model = build_gpt_model(model_cfg, model_cfg.transformer_config(context_parallel_size=2))
    cfg = LossConfig(kind="sed", tau=0.05, top_k=2)
    packed = [packed_sample(make_samples(), SEQ, thd=True, cp_size=2)]
    unpacked = [sample_from_tokens(ids, mask, SEQ) for ids, mask in make_samples()]
    thd = BatchSpec(micro_batch_size=1, seq_length=SEQ, create_attention_mask=False, packed_thd=True)
    rows = BatchSpec(micro_batch_size=1, seq_length=SEQ, create_attention_mask=False)
    packed_loss, packed_grads = _cp_loss_and_grads(model, packed, thd, cfg)
    loss, grads = _cp_loss_and_grads(model, unpacked, rows, cfg)
    # RoPE restarts per sample in both; the sums run in another order: fp32 rounding, ~1e-7.
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-5)
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_equals_unpacked_under_cp():
    run_distributed(check_packed_equals_unpacked_under_cp, world_size=2, cp=2)

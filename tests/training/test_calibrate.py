"""τ calibration through the shared batch pipeline: packed THD rows give the τ of unpacked rows.

Transformer Engine's packed-sequence attention needs a GPU, so the model here runs the local
layers under the block-diagonal causal mask that the micro-batch's cu_seqlens describe: if the
pipeline dropped or garbled the boundaries, samples would attend to each other and the top-k
masses would change (the test checks that too).
"""

import contextlib
import io

import pytest
import torch

from sed_megatron.data.packing import packed_sample
from sed_megatron.data.simple import sample_from_tokens
from sed_megatron.loss import LossConfig
from sed_megatron.testing.models import tiny_gpt

from ..distributed import run_distributed

VOCAB, SEQ = 96, 24


def samples():
    gen = torch.Generator().manual_seed(3)
    out = []
    for length, prompt in ((7, 3), (9, 2), (5, 2), (11, 4), (6, 1), (8, 5)):
        ids = torch.randint(0, VOCAB, (length,), generator=gen).tolist()
        out.append((ids, [0] * prompt + [1] * (length - prompt)))
    return out


class ThdAsBlockMask(torch.nn.Module):
    """A local-layer model chunk that takes THD inputs: attention within each cu_seqlens segment.

    ignore_boundaries=True attends across the whole flattened row (what a pipeline that lost
    the boundaries would do)."""

    def __init__(self, model, ignore_boundaries=False):
        super().__init__()
        self.model, self.ignore_boundaries = model, ignore_boundaries
        self.pg_collection, self.config, self.model_type = model.pg_collection, model.config, model.model_type

    def set_input_tensor(self, tensor):
        self.model.set_input_tensor(tensor)

    def forward(self, tokens, position_ids, attention_mask, packed_seq_params=None):
        assert attention_mask is None and packed_seq_params.qkv_format == "thd"
        cu = packed_seq_params.cu_seqlens_q.tolist()
        if self.ignore_boundaries:
            cu = [0, cu[-1]]
        n = tokens.shape[1]
        mask = torch.ones(1, 1, n, n, dtype=torch.bool)  # True = masked
        for a, b in zip(cu[:-1], cu[1:]):
            mask[..., a:b, a:b] = torch.triu(torch.ones(b - a, b - a, dtype=torch.bool), diagonal=1)
        return self.model(tokens, position_ids, mask)


def calibrate(model, rows, packed, token_set, k=2, ratio=0.7):
    from sed_megatron.training.batch import BatchSpec
    from sed_megatron.training.calibrate import calibrate_tau, local_topk_masses
    from sed_megatron.training.step import StepConfig

    spec = BatchSpec(micro_batch_size=1, seq_length=SEQ, create_attention_mask=not packed, packed_thd=packed)
    cfg = StepConfig(loss=LossConfig(kind="ce", top_k=k), batch=spec, vocab_size=VOCAB)
    values = local_topk_masses([model], rows, len(rows), cfg, token_set)
    return torch.sort(values).values, calibrate_tau([model], rows, len(rows), cfg, ratio, token_set)


def check_packed_thd_calibration_equals_unpacked():
    from megatron.core.enums import ModelType

    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=2 * SEQ)
    model.model_type = ModelType.encoder_or_decoder  # as Megatron's get_model sets it
    causal = torch.triu(torch.ones(1, SEQ, SEQ, dtype=torch.bool), diagonal=1)
    unpacked = [{**sample_from_tokens(ids, mask, SEQ), "attention_mask": causal} for ids, mask in samples()]
    data = samples()
    packed = [packed_sample(data[i:i + 2], SEQ, thd=True) for i in range(0, len(data), 2)]  # 3 rows of 2 samples
    assert all(row["cu_seqlens"][2] > 0 for row in packed)
    for token_set in ("response", "all"):
        values, tau = calibrate(model, unpacked, False, token_set)
        packed_values, packed_tau = calibrate(ThdAsBlockMask(model), packed, True, token_set)
        assert values.numel() == packed_values.numel() > 10
        # RoPE turns a packed sample by another absolute angle (same relative angles): fp32
        # rounding only, ~1e-7 relative.
        torch.testing.assert_close(packed_values, values, rtol=1e-5, atol=1e-6)
        assert abs(packed_tau - tau) <= 1e-5 * tau, (packed_tau, tau)
        leaky_values, _ = calibrate(ThdAsBlockMask(model, ignore_boundaries=True), packed, True, token_set)
        # Attending across samples moves the masses by far more than the tolerance above.
        assert (leaky_values - values).abs().max() > 100 * 1e-6, "the check must see samples attend to each other"


def test_packed_thd_calibration_equals_unpacked():
    run_distributed(check_packed_thd_calibration_equals_unpacked, world_size=1)


class FullInputSamples:
    """Hand-made samples as unpacked rows with the causal mask; `with_full_input()` as the datasets have it."""

    def __init__(self, data, full_input=False):
        self.data, self.full_input = data, full_input
        self.causal = torch.triu(torch.ones(1, SEQ, SEQ, dtype=torch.bool), diagonal=1)

    def with_full_input(self):
        return FullInputSamples(self.data, full_input=True)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, index):
        ids, mask = self.data[index]
        return {**sample_from_tokens(ids, mask, SEQ, full_input=self.full_input), "attention_mask": self.causal}


def published_tau_by_hand(model, data, k, ratio):
    """The published compute_cumsum_threshold: the model on each sample's full ids (no shift),
    top-k probability mass at every position, tau = sorted(values)[-int(r * N)]."""
    values = []
    with torch.no_grad():
        for ids, _ in data:
            ids = torch.tensor(ids[:SEQ])[None]  # a sample of SEQ + 1 ids: no room past its end (see below)
            n = ids.shape[1]
            causal = torch.triu(torch.ones(1, 1, n, n, dtype=torch.bool), diagonal=1)
            logits = model(ids, torch.arange(n)[None], causal)  # [1, n, V]
            values += torch.softmax(logits.double(), dim=-1).topk(k, dim=-1).values.sum(-1).flatten().tolist()
    values = sorted(values)
    return values, values[-int(ratio * len(values))]


def _published_calibration_by_hand():
    from megatron.core.enums import ModelType

    from sed_megatron.loss.tau import calibration_top_k

    model = tiny_gpt(vocab_size=VOCAB, max_sequence_length=2 * SEQ)
    model.model_type = ModelType.encoder_or_decoder
    model.eval()
    gen = torch.Generator().manual_seed(5)
    # Samples of 7, 9, 5, 11 ids and one of SEQ + 1 = 25, which fills the SEQ positions: 56 values.
    data = samples()[:4] + [(torch.randint(0, VOCAB, (SEQ + 1,), generator=gen).tolist(), [0] * 5 + [1] * 20)]
    rows = FullInputSamples(data)
    k = calibration_top_k("published", train_top_k=2)
    assert k == 10
    for ratio in (0.7, 0.3, 0.01):  # int(0.01 * 56) = 0: the smallest value
        values, tau = calibrate(model, rows, False, "published", k=k, ratio=ratio)
        expected, expected_tau = published_tau_by_hand(model, data, k, ratio)
        assert values.numel() == len(expected) == sum(min(len(ids), SEQ) for ids, _ in data)
        # Same model and positions, another sequence length (causal: padding after is unseen) and
        # softmax in fp32 vs fp64: rounding only.
        torch.testing.assert_close(values.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-5, atol=1e-6)
        assert abs(tau - expected_tau) <= 1e-5, (tau, expected_tau)
    # k of training (2) on the same positions: another tau; and the `all` set lacks the last positions.
    assert calibrate(model, rows, False, "published", k=2)[1] == pytest.approx(published_tau_by_hand(model, data, 2,
                                                                                                      0.7)[1], abs=1e-5)
    assert calibrate(model, rows, False, "all", k=10)[0].numel() == len(expected) - 4


def check_published_calibration_by_hand():
    """The by-hand comparison; returns what it wrote on stderr (the check runs in a process kept
    for the session, whose stderr pytest does not capture)."""
    with contextlib.redirect_stderr(io.StringIO()) as err:
        _published_calibration_by_hand()
    return err.getvalue()


def test_published_calibration_equals_the_published_rule_by_hand():
    err = run_distributed(check_published_calibration_by_hand, world_size=1)
    # The sample that fills SEQ is scored without the position past its end, and a line says so.
    assert "1 of 5 samples fill --seq-length 24" in err

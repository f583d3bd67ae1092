"""Training reads a preprocessed chat dataset (tokens + assistant-only loss masks), packed or not."""

import json
import os

import pytest

from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess
from sed_megatron.testing.tiny_hf import make_tokenizer

from .launch import train
from .test_train import TAU_RTOL, assert_curves_close, calibrated_tau

NUMBERS = "zero one two three four five six seven eight nine".split()


@pytest.fixture(scope="module")
def sums_dataset(tmp_path_factory):
    """100 chats 'what is A plus B' -> the sum; every sample has the same 10 tokens."""
    tmp_path = tmp_path_factory.mktemp("sums")
    make_tokenizer(str(tmp_path / "tok"), ["what", "is", "plus"] + NUMBERS)
    with open(tmp_path / "chats.jsonl", "w") as f:
        for a in range(10):
            for b in range(10):
                question = f"what is {NUMBERS[a]} plus {NUMBERS[b]}"
                f.write(json.dumps({"messages": [{"role": "user", "content": question},
                                                 {"role": "assistant", "content": str(a + b)}]}) + "\n")
    prefix = str(tmp_path / "data" / "sums")
    summary = preprocess(PreprocessConfig(input=str(tmp_path / "chats.jsonl"), tokenizer=str(tmp_path / "tok"),
                                          output_prefix=prefix, seq_length=64), progress=False)
    assert summary["samples"] == 100 and summary["lengths"]["p50"] == summary["lengths"]["max"] == 10
    return prefix


def data_flags(prefix):
    return ["--sft-data-kind", "indexed", "--sft-data-path", prefix, "--sft-valid-fraction", "0.1"]


def test_train_on_chat_data_tokenized_on_the_fly(sums_dataset, tmp_path):
    """--sft-data-kind chat: the raw chats, tokenized by the entry point into its cache (the
    fixture's preprocess_sft_data output, byte for byte), then reused. Packed rows at CP=1 (the
    data loader's block-diagonal mask), one process. Unpacked rows of the same data train in
    test_packed_and_unpacked_rows_train_alike_under_cp (the same curve as packed THD rows at
    CP=2), so they are not trained again here."""
    from sed_megatron.data.cache import tokenized_dataset

    root = os.path.dirname(os.path.dirname(sums_dataset))
    chats, tokenizer, cache = os.path.join(root, "chats.jsonl"), os.path.join(root, "tok"), str(tmp_path / "cache")
    flags = ["--sft-data-kind", "chat", "--sft-data-path", chats, "--sft-tokenizer", tokenizer,
             "--sft-data-cache-dir", cache, "--sft-valid-fraction", "0.1", "--tensor-model-parallel-size", "1",
             "--train-iters", "30", "--save", "", "--sed-calibrate-samples", "10", "--lr", "3e-3", "--sft-pack"]
    records = train(str(tmp_path / "packed"), 1, flags)
    assert len(records) == 30
    # Only the answer digits and the end-of-turn token carry loss; the model learns them.
    first, last = records[0], records[-1]
    assert last["ce_loss"] < first["ce_loss"] - 1.0, (first["ce_loss"], last["ce_loss"])
    with open(tmp_path / "packed" / "train.log") as f:
        noted = [line for line in f if line.startswith("sed_megatron.train: tokenized ")]
    assert len(noted) == 1 and f"{chats} into {cache}/" in noted[0] and ": 100 samples, 1000 tokens" in noted[0]
    prefix = noted[0].split(" into ")[1].split(":")[0] + "/data"
    for suffix in (".bin", ".idx", "_loss_mask.bin", "_loss_mask.idx"):
        with open(prefix + suffix, "rb") as f, open(sums_dataset + suffix, "rb") as g:
            assert f.read() == g.read(), suffix
    cfg = PreprocessConfig(input=chats, tokenizer=tokenizer, output_prefix="", seq_length=64)
    assert tokenized_dataset(cfg, cache) == (prefix, f"reusing {chats} tokenized in {os.path.dirname(prefix)}")


def test_packed_and_unpacked_rows_train_alike_under_cp(sums_dataset, tmp_path):
    """CP=2 on the local layers: packed THD rows (each 9-position sample padded to 12 = a multiple
    of 2 x CP, 5 per row of 64, chunked per sample) and unpacked rows (chunked per row, with the
    data loader's causal mask) over the same 10 samples per step give the same 5-step curve and
    the same calibrated tau (the packed calibration scores the rows of exactly the first 10
    validation samples)."""
    flags = data_flags(sums_dataset) + ["--tensor-model-parallel-size", "1", "--context-parallel-size", "2",
                                        "--train-iters", "5", "--save", "", "--sed-calibrate-samples", "10",
                                        "--lr", "3e-4"]
    # One step: 10 samples = 2 micro-batches of 5 unpacked rows, or 2 packed rows of 5 samples.
    unpacked = train(str(tmp_path / "unpacked"), 2, flags + ["--micro-batch-size", "5", "--global-batch-size", "10"])
    packed = train(str(tmp_path / "packed"), 2, flags + ["--sft-pack", "--micro-batch-size", "1",
                                                         "--global-batch-size", "2"])
    assert len(unpacked) == 5 and 0.0 < unpacked[0]["mask_rate"] < 1.0  # the SED mask splits the tokens
    # RTOL as for the layouts: RoPE restarts per sample in both, only the summation order differs.
    assert_curves_close(packed, unpacked, "packed vs unpacked at CP=2")
    tau = calibrated_tau(str(tmp_path / "unpacked" / "train.log"))
    assert calibrated_tau(str(tmp_path / "packed" / "train.log")) == pytest.approx(tau, rel=TAU_RTOL)

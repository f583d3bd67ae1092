"""SFT data (data/sources.py: JSON lines, parquet, shards, saved datasets; data/schemas.py: messages,
ShareGPT, prompt/response, alpaca) -> Megatron indexed dataset of tokens and assistant-only loss masks.

Each sample becomes one document in two parallel indexed datasets:
    PREFIX.bin / PREFIX.idx                      token ids
    PREFIX_loss_mask.bin / PREFIX_loss_mask.idx  1 where the token is a target (assistant text)

Loss masks come from the tokenizer's chat template: for every assistant turn, the text the
template renders before it (with the generation prompt) is the context, and what the turn adds
(its content and end-of-turn tokens) is the target. The pieces are tokenized one after the
other, as the model sees them when it generates. Every assistant turn of a multi-turn chat
carries loss.
"""

import json
import math
import os
from dataclasses import dataclass

from .schemas import SCHEMAS, Fields, SampleError, to_messages
from .sources import open_source, where

TRUNCATION = ("error", "skip", "truncate")
PAPER_MAX_SAMPLE_TOKENS = 32000
"""The published SED-SFT data kept samples of up to 32,000 tokens (MAX_SEQ_LENGTH) and trained
them whole; the default --seq-length keeps the same samples."""


@dataclass(frozen=True)
class PreprocessConfig:
    input: str
    tokenizer: str
    output_prefix: str
    seq_length: int | None = PAPER_MAX_SAMPLE_TOKENS - 1
    """Samples longer than seq_length + 1 tokens follow `truncation` (default: samples of up to
    32,000 tokens, the paper's); None: no limit."""
    schema: str = "auto"
    """One of schemas.SCHEMAS; auto: each row by the first schema whose field it has."""
    messages_key: str = "messages"
    conversations_key: str = "conversations"
    prompt_key: str = "prompt"
    response_key: str = "response"
    system_key: str | None = None
    use_chat_template: bool = True
    """prompt_response only: wrap as a user/assistant chat (False: prompt + response + EOS)."""
    truncation: str = "error"
    """error: fail; skip: count and report; truncate: cut the end (the prompt must fit)."""
    skip_bad: bool = False
    """Count and report bad samples instead of failing on the first."""
    vocab_size: int | None = None
    """The model's vocabulary size; ids at or above it are errors (default: the tokenizer's)."""
    workers: int = 1

    @property
    def fields(self):
        return Fields(messages=self.messages_key, conversations=self.conversations_key, prompt=self.prompt_key,
                      response=self.response_key, system=self.system_key)

    def __post_init__(self):
        if self.schema not in SCHEMAS:
            raise ValueError(f"--schema: unknown schema {self.schema!r}; expected one of {', '.join(SCHEMAS)}")
        if self.truncation not in TRUNCATION:
            raise ValueError(f"--truncation: unknown policy {self.truncation!r}; expected one of {TRUNCATION}")
        if self.seq_length is not None and self.seq_length < 1:
            raise ValueError(f"--seq-length: must be >= 1, got {self.seq_length}")
        if self.workers < 1:
            raise ValueError(f"--workers: must be >= 1, got {self.workers}")


def load_tokenizer(path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as err:  # transformers raises many kinds; one line names the directory
        raise ValueError(f"{path}: cannot load a Hugging Face tokenizer ({type(err).__name__}: {err})") from None


def _render(tokenizer, messages, add_generation_prompt):
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as err:  # jinja raises its own errors (e.g. "roles must alternate")
        raise SampleError(f"the chat template rejects this chat: {err}", "the chat template rejects the chat") from None


def _encode(tokenizer, text):
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_chat(tokenizer, messages):
    """(ids, loss_mask) of a chat through the tokenizer's chat template."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, which chat samples need "
                         "(prompt/response samples can go without: --no-chat-template)")
    ids, mask, rendered = [], [], ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (context.startswith(rendered) and turn.startswith(context)):
            raise SampleError("the chat template does not render each turn as an extension of the "
                              "previous ones; assistant tokens cannot be located")
        context_ids = _encode(tokenizer, context[len(rendered):])
        target_ids = _encode(tokenizer, turn[len(context):])
        ids += context_ids + target_ids
        mask += [0] * len(context_ids) + [1] * len(target_ids)
        rendered = turn
    rest = _render(tokenizer, messages, add_generation_prompt=False)[len(rendered):]
    if rest:  # turns after the last assistant message: context without loss
        tail = _encode(tokenizer, rest)
        ids += tail
        mask += [0] * len(tail)
    return ids, mask


def tokenize_plain(tokenizer, messages):
    """(ids, loss_mask) of prompt + response + EOS without a chat template."""
    prompt = "".join(m["content"] for m in messages if m["role"] != "assistant")
    response = messages[-1]["content"]
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    response_ids = _encode(tokenizer, response)
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to end responses with")
    response_ids.append(tokenizer.eos_token_id)
    return prompt_ids + response_ids, [0] * len(prompt_ids) + [1] * len(response_ids)


def _record(payload):
    """The row itself, or a JSON line parsed (None for a blank line)."""
    if not isinstance(payload, (bytes, bytearray)):
        return payload
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SampleError(f"not valid UTF-8 (byte {err.start})", "not valid UTF-8") from None
    if not text.strip():
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise SampleError(f"malformed JSON: {err.msg} (column {err.colno})", "malformed JSON") from None


def process_record(tokenizer, cfg: PreprocessConfig, payload):
    """One row (a dict, or a JSON line's bytes) -> (ids, mask, schema), None for a blank line;
    raises SampleError."""
    record = _record(payload)
    if record is None:
        return None
    messages, schema = to_messages(record, cfg.schema, cfg.fields)
    if schema != "prompt_response" or cfg.use_chat_template:
        ids, mask = tokenize_chat(tokenizer, messages)
    else:
        ids, mask = tokenize_plain(tokenizer, messages)
    vocab_size = cfg.vocab_size or len(tokenizer)
    if ids and max(ids) >= vocab_size:
        raise SampleError(f"token id {max(ids)} >= vocabulary size {vocab_size}", "token id >= vocabulary size")
    limit = None if cfg.seq_length is None else cfg.seq_length + 1
    if limit is not None and len(ids) > limit:
        if cfg.truncation == "truncate" and any(mask[:limit]):
            ids, mask = ids[:limit], mask[:limit]
        else:
            raise SampleError(f"sample of {len(ids)} tokens exceeds --seq-length + 1 = {limit}"
                              + (" (and its prompt alone fills it)" if cfg.truncation == "truncate" else ""),
                              f"longer than --seq-length + 1 = {limit} tokens", length=len(ids))
    if not any(mask):
        raise SampleError("no token carries loss")
    return ids, mask, schema


_worker_state = {}


def _init_worker(cfg):
    _worker_state["cfg"] = cfg
    _worker_state["tokenizer"] = load_tokenizer(cfg.tokenizer)


def _process(item):
    try:
        return item, process_record(_worker_state["tokenizer"], _worker_state["cfg"], item.payload), None
    except SampleError as err:
        return item, None, (str(err), err.reason, err.length)


def output_paths(prefix):
    """The four files of a dataset at prefix."""
    return [prefix + ".bin", prefix + ".idx", prefix + "_loss_mask.bin", prefix + "_loss_mask.idx"]


def preprocess(cfg: PreprocessConfig, progress=True):
    """Write the dataset; returns a summary dict. Raises ValueError naming file and line on bad input.

    Output goes to temporary names beside the prefix and is renamed into place at the end, so
    a failure leaves nothing at the prefix.
    """
    import multiprocessing

    import numpy
    import torch
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    source = open_source(cfg.input)
    tokenizer = load_tokenizer(cfg.tokenizer)  # fail early, in this process
    vocab_size = cfg.vocab_size or len(tokenizer)
    if cfg.vocab_size is not None and cfg.vocab_size < len(tokenizer):
        raise ValueError(f"--vocab-size {cfg.vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
    os.makedirs(os.path.dirname(os.path.abspath(cfg.output_prefix)), exist_ok=True)
    tmp_prefix = f"{cfg.output_prefix}.tmp-{os.getpid()}"
    tmp_paths, final_paths = output_paths(tmp_prefix), output_paths(cfg.output_prefix)
    summary = {"samples": 0, "tokens": 0, "loss_tokens": 0, "skipped": 0, "skipped_lines": [], "reasons": {},
               "schemas": {}, "input": source.kind}
    one_file = len(source.parts) == 1
    lengths = []
    try:
        tokens_out = IndexedDatasetBuilder(tmp_paths[0], dtype=DType.optimal_dtype(vocab_size))
        mask_out = IndexedDatasetBuilder(tmp_paths[2], dtype=numpy.uint8)
        if cfg.workers > 1:
            pool = multiprocessing.get_context("spawn").Pool(cfg.workers, _init_worker, (cfg,))
            results = pool.imap(_process, source.items(), chunksize=64)  # ordered: deterministic output
        else:
            pool = None
            _worker_state.update(cfg=cfg, tokenizer=tokenizer)
            results = map(_process, source.items())
        if progress:
            from tqdm import tqdm

            results = tqdm(results, total=source.total, unit=" samples", desc=os.path.basename(cfg.input.rstrip("/")))
        try:
            for item, sample, error in results:
                if error is not None:
                    message, reason, length = error
                    skippable = cfg.skip_bad or (cfg.truncation == "skip" and length is not None)
                    if not skippable:
                        raise ValueError(f"{where(item)}: {message}")
                    at = item.number if one_file else where(item)
                    summary["skipped"] += 1
                    summary["skipped_lines"].append(at)
                    _count_skip(summary["reasons"], reason, at, length)
                    continue
                if sample is None:
                    continue
                ids, mask, schema = sample
                summary["schemas"][schema] = summary["schemas"].get(schema, 0) + 1
                tokens_out.add_item(torch.tensor(ids, dtype=torch.int64))
                tokens_out.end_document()
                mask_out.add_item(torch.tensor(mask, dtype=torch.uint8))
                mask_out.end_document()
                summary["samples"] += 1
                summary["tokens"] += len(ids)
                summary["loss_tokens"] += sum(mask)
                lengths.append(len(ids))
        finally:
            if pool is not None:
                pool.terminate()
        if summary["samples"] == 0:
            raise ValueError(f"{cfg.input}: no usable samples")
        tokens_out.finalize(tmp_paths[1])
        mask_out.finalize(tmp_paths[3])
        for tmp, final in zip(tmp_paths, final_paths):
            os.replace(tmp, final)
    finally:
        for path in tmp_paths:
            if os.path.exists(path):
                os.remove(path)
    summary["skipped_lines"] = summary["skipped_lines"][:20]
    summary["lengths"] = length_distribution(lengths)
    return summary


FIRST_LINES = 5
"""Line numbers kept per skip reason."""


def _count_skip(reasons, reason, line_no, length):
    entry = reasons.setdefault(reason, {"count": 0, "first_lines": [], "min_length": None, "max_length": None})
    entry["count"] += 1
    if len(entry["first_lines"]) < FIRST_LINES:
        entry["first_lines"].append(line_no)
    if length is not None:
        entry["min_length"] = length if entry["min_length"] is None else min(entry["min_length"], length)
        entry["max_length"] = length if entry["max_length"] is None else max(entry["max_length"], length)


def length_distribution(lengths):
    """p50, p90 and max of the kept samples' token counts (nearest rank)."""
    if not lengths:
        return {"p50": None, "p90": None, "max": None}
    ordered = sorted(lengths)
    rank = lambda q: ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]  # noqa: E731
    return {"p50": rank(0.5), "p90": rank(0.9), "max": ordered[-1]}


def summary_line(summary):
    """One line: samples kept, their length distribution, and how many were dropped."""
    lengths = summary["lengths"]
    kept = f"{summary['samples']} samples, {summary['tokens']} tokens ({summary['loss_tokens']} with loss)"
    if lengths["max"] is not None:
        kept += f"; sample length p50 {lengths['p50']}, p90 {lengths['p90']}, max {lengths['max']} tokens"
    return f"{kept}; dropped {summary['skipped']}"


def schema_line(summary, chosen):
    """One line: what was read and in which schema(s), detected (auto) or chosen."""
    counts = ", ".join(f"{name} ({count} samples)" if len(summary["schemas"]) > 1 else name
                       for name, count in summary["schemas"].items())
    how = "detected per row; --schema to choose" if chosen == "auto" else "--schema"
    return f"read {summary['input']}, schema {counts} ({how})"


def skip_report(summary):
    """One line per skip reason: the count, the length range (where it applies), the first lines."""
    lines = []
    for reason, entry in summary["reasons"].items():
        lengths = (f", {entry['min_length']}-{entry['max_length']} tokens" if entry["min_length"] is not None else "")
        more = ", ..." if entry["count"] > len(entry["first_lines"]) else ""
        label = "lines" if all(isinstance(at, int) for at in entry["first_lines"]) else "at"
        lines.append(f"skipped {entry['count']} sample(s): {reason}{lengths} "
                     f"({label} {', '.join(map(str, entry['first_lines']))}{more})")
    return lines


def read_indexed_sft(prefix):
    """(tokens, loss masks) IndexedDatasets of a prefix written by preprocess()."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for path in output_paths(prefix):
        if not os.path.exists(path):
            raise ValueError(f"{path}: missing (write the dataset with tools/preprocess_sft_data.py)")
    tokens, masks = IndexedDataset(prefix), IndexedDataset(prefix + "_loss_mask")
    if len(tokens) != len(masks):
        raise ValueError(f"{prefix}: {len(tokens)} token documents but {len(masks)} loss-mask documents")
    return tokens, masks


def split_indices(num_samples, valid_fraction, seed):
    """(train, valid) sample indices: a seeded permutation, the last ceil(fraction * n) for validation."""
    import torch

    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed)).tolist()
    num_valid = math.ceil(valid_fraction * num_samples) if valid_fraction > 0 else 0
    if num_valid >= num_samples:
        raise ValueError(f"valid fraction {valid_fraction} leaves no training sample out of {num_samples}")
    return order[: num_samples - num_valid], order[num_samples - num_valid :]


class IndexedSFTDataset:
    """Samples of one split of a preprocessed dataset, reshuffled every epoch by seed.

    Index i of `length` reads epoch i // n, position i % n of that epoch's permutation of the
    split's n samples, so any number of training samples can be drawn deterministically.
    """

    def __init__(self, prefix, indices, length, seq_length, seed):
        import numpy

        from .simple import sample_from_tokens

        self._sample = sample_from_tokens
        self.tokens, self.masks = read_indexed_sft(prefix)
        longest = int(numpy.max(self.tokens.sequence_lengths)) if len(self.tokens) else 0
        if longest > seq_length + 1:
            raise ValueError(f"{prefix}: samples of up to {longest} tokens do not fit --seq-length + 1 = "
                             f"{seq_length + 1} (preprocess with --seq-length {seq_length} or raise it)")
        if not indices:
            raise ValueError(f"{prefix}: this split has no samples")
        self.indices, self.length, self.seq_length, self.seed = list(indices), length, seq_length, seed
        self._epoch, self._order = None, None
        self.full_input = False

    def with_full_input(self):
        """This split's samples with every id an input: the published τ calibration's view."""
        from .simple import full_input_view

        return full_input_view(self)

    def __len__(self):
        return self.length

    def _permutation(self, epoch):
        import torch

        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.indices), generator=gen).tolist()
        return self._order

    def epoch_documents(self, epoch):
        """The documents of one epoch, in the order it reads them."""
        return [self.indices[j] for j in self._permutation(epoch)]

    def __getitem__(self, index):
        epoch, position = divmod(index, len(self.indices))
        document = self.indices[self._permutation(epoch)[position]]
        return self._sample(self.tokens[document].tolist(), self.masks[document].tolist(), self.seq_length,
                            full_input=self.full_input)

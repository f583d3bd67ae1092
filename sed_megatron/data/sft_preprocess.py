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

from .preprocess_run import output_paths, preprocess  # noqa: F401  the driver (units, workers, resume)
from .reasoning import DEFAULT_MODE as DEFAULT_REASONING
from .reasoning import MODES as REASONING_MODES
from .reasoning import for_template, has_reasoning
from .schemas import SCHEMAS, Fields, SampleError, to_messages

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
    reasoning: str = DEFAULT_REASONING
    """How assistant turns' thinking reaches the chat template: inline, field or drop (data/reasoning.py)."""
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
        if self.reasoning not in REASONING_MODES:
            raise ValueError(f"--reasoning: unknown mode {self.reasoning!r}; expected one of "
                             f"{', '.join(REASONING_MODES)}")
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
    """(ids, loss_mask) of a chat through the tokenizer's chat template.

    Assistant turn i, as the model writes it at inference, is what rendering messages[: i + 1]
    adds to messages[:i] rendered with the generation prompt. The sample is the chat as the
    template renders it whole, and a turn carries loss where that rendering begins with the turn
    as written: the context the model had, then its tokens. A template that rewrites history
    (Qwen3 drops the thinking of the turns before the last user query) renders the earlier turns
    otherwise than the model wrote them: those are context without loss, as the model sees them
    when it writes the later turns; the last assistant turn always carries loss. Turns after the
    last assistant turn are context, left out where they would rewrite it. The text is tokenized
    piece by piece at the trained turns' boundaries.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the tokenizer has no chat template, which chat samples need "
                         "(prompt/response samples can go without: --no-chat-template)")
    turns = []  # (len(context), rendered turn) per assistant turn
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        context = _render(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not turn.startswith(context):
            raise SampleError(f"message {i}: the chat template does not render the turn after its generation "
                              "prompt; assistant tokens cannot be located",
                              "the chat template does not render a turn after its generation prompt")
        turns.append((len(context), turn))
    whole = _render(tokenizer, messages, add_generation_prompt=False)
    if not whole.startswith(turns[-1][1]):  # the turns after it rewrite the last assistant turn
        whole = turns[-1][1]
    ids, mask, at = [], [], 0
    for start, turn in turns:
        if not whole.startswith(turn):
            continue  # rendered otherwise in the later turns' context: context without loss
        for piece, loss in ((whole[at:start], 0), (turn[start:], 1)):
            piece_ids = _encode(tokenizer, piece) if piece else []
            ids += piece_ids
            mask += [loss] * len(piece_ids)
        at = len(turn)
    if at < len(whole):  # turns after the last assistant message: context without loss
        tail = _encode(tokenizer, whole[at:])
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
        ids, mask = tokenize_chat(tokenizer, for_template(tokenizer, messages, cfg.reasoning))
    else:
        if cfg.reasoning == "field" and has_reasoning(messages):
            raise SampleError("reasoning, which --reasoning field gives to the chat template, and "
                              "--no-chat-template: use --reasoning inline or drop",
                              "--reasoning field without a chat template")
        ids, mask = tokenize_plain(tokenizer, for_template(tokenizer, messages, cfg.reasoning))
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

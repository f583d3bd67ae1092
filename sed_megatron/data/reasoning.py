"""Reasoning (thinking) in SFT data: found inline or in a field, given to the chat template as --reasoning says.

    messages = for_template(tokenizer, messages, "inline")     # before tokenize_chat

Data carries an assistant turn's thinking either inline, `<think>...</think>` before the answer in
its content, or in a field beside it (`reasoning_content`, `reasoning`, `thinking`: schemas.py
keeps it as the message's "reasoning"). --reasoning says what the chat template is given:

    inline  the thinking in the content as `<think>\\nR\\n</think>\\n\\nANSWER` (a field is moved there;
            inline thinking stays as the data has it). Templates that know reasoning (Qwen3) take
            it out of the content themselves; the others render it as text.
    field   the thinking as the message's `reasoning_content` (as Qwen3's template reads it; inline
            thinking is moved there). A template that does not render that field is refused.
    drop    no thinking: fields and inline `<think>` blocks are removed.

What the template then does with it is its own business (Qwen3 renders it for the turns after
the last user query only); tokenize_chat trains what the template renders.
"""

from .schemas import SampleError

MODES = ("inline", "field", "drop")
DEFAULT_MODE = "inline"
"""inline keeps the thinking the data has, on every template: a template that reads reasoning
(Qwen3) takes it out of the content as it would `reasoning_content`, so the tokens are those of
field mode; the others train it as the text the model generates."""
OPEN, CLOSE = "<think>", "</think>"
TEMPLATE_FIELD = "reasoning_content"
"""The message key a chat template reads reasoning from (Qwen3, DeepSeek-R1, vLLM's responses)."""
_PROBE = "sed-megatron-reasoning-probe"
_renders_field = {}  # chat template text -> whether it renders TEMPLATE_FIELD


def split_inline(content, index):
    """(the inline reasoning or None, the answer) of an assistant message's content; SampleError
    for `<think>` without `</think>` and the like."""
    opens, closes = content.count(OPEN), content.count(CLOSE)
    if not opens and not closes:
        return None, content
    where = f"message {index}: "
    if opens != closes:
        missing = CLOSE if opens > closes else OPEN
        present = OPEN if opens > closes else CLOSE
        raise SampleError(f"{where}{present!r} without {missing!r}", f"{present!r} without {missing!r}")
    if opens > 1:
        raise SampleError(f"{where}{opens} <think> blocks (one before the answer is supported)",
                          "more than one <think> block")
    head, answer = content.split(CLOSE)
    if not head.lstrip().startswith(OPEN):
        raise SampleError(f"{where}text before <think> (the reasoning must open the message)",
                          "text before <think>")
    return head.lstrip()[len(OPEN):].strip(), answer.lstrip()


def renders_field(tokenizer):
    """Whether the tokenizer's chat template renders an assistant message's TEMPLATE_FIELD (tried on
    a probe chat once per template)."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if template not in _renders_field:
        probe = [{"role": "user", "content": "question"},
                 {"role": "assistant", "content": "answer", TEMPLATE_FIELD: _PROBE}]
        try:
            text = tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # noqa: BLE001 — a template that rejects the probe does not render the field
            text = ""
        _renders_field[template] = _PROBE in text
    return _renders_field[template]


def for_template(tokenizer, messages, mode):
    """The chat as the template gets it under `mode` (see the module docstring); SampleError for
    bad reasoning (unclosed <think>, reasoning both inline and in a field, a field the template
    does not render in field mode, an answer that is empty once its reasoning is out)."""
    if mode not in MODES:
        raise ValueError(f"--reasoning: unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    out = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            out.append({"role": message["role"], "content": message["content"]})
            continue
        field = message.get("reasoning")
        inline, answer = split_inline(message["content"], i)
        if field is not None and inline is not None:
            raise SampleError(f"message {i}: reasoning both in a field and inline (<think>) in the content",
                              "reasoning both in a field and inline")
        if not answer.strip():
            raise SampleError(f"message {i}: no answer after the reasoning", "no answer after the reasoning")
        reasoning = field if field is not None else inline
        if mode == "inline" or reasoning is None:
            content = message["content"] if field is None else f"{OPEN}\n{field.strip()}\n{CLOSE}\n\n{answer.lstrip()}"
            out.append({"role": "assistant", "content": content})
        elif mode == "drop":
            out.append({"role": "assistant", "content": answer})
        else:
            if not renders_field(tokenizer):
                name = getattr(tokenizer, "name_or_path", "") or "the tokenizer"
                raise SampleError(f"message {i}: reasoning, which the chat template of {name} does not render as "
                                  f"{TEMPLATE_FIELD!r} (--reasoning field): use --reasoning inline (the thinking "
                                  f"as text) or drop", f"reasoning the chat template does not render as "
                                  f"{TEMPLATE_FIELD!r} (--reasoning field)")
            out.append({"role": "assistant", "content": answer, TEMPLATE_FIELD: reasoning.strip()})
    return out


def has_reasoning(messages):
    return any(m["role"] == "assistant" and (m.get("reasoning") is not None or OPEN in m["content"]
                                              or CLOSE in m["content"]) for m in messages)

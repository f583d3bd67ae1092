"""The schemas SFT data comes in, each read into one chat: a list of {"role", "content"}.

    messages         {"messages": [{"role": "user", "content": ...}, ...]}                (OpenAI)
    sharegpt         {"conversations": [{"from": "human", "value": ...}, ...], "system": ...}
    prompt_response  {"prompt": ..., "response": ...}          (--prompt-key, --response-key)
    alpaca           {"instruction": ..., "input": ..., "output": ..., "system": ...}

auto: each row read by the first schema whose field it has, in that order. A bad row raises
SampleError (the caller names the file and row). A reasoning field beside an assistant's content
(`reasoning_content`, `reasoning`, `thinking`) is kept as the message's "reasoning";
data/reasoning.py decides how the chat template gets it (--reasoning).
"""

from dataclasses import dataclass

SCHEMAS = ("auto", "messages", "sharegpt", "prompt_response", "alpaca")
ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function_call": "assistant", "observation": "tool"}
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
ALPACA = ("instruction", "input", "output")


class SampleError(ValueError):
    """A bad sample; the message says what is wrong (the caller adds file and line).

    reason: the kind of problem, the same for every sample it hits (the skipped-sample report
    counts per reason); length: the sample's token count where it matters."""

    def __init__(self, message, reason=None, length=None):
        super().__init__(message)
        self.reason = reason or message
        self.length = length


@dataclass(frozen=True)
class Fields:
    """The field names a row's schema is read with."""
    messages: str = "messages"
    conversations: str = "conversations"
    prompt: str = "prompt"
    response: str = "response"
    system: str | None = None
    """A system prompt field (prompt_response; sharegpt and alpaca read `system` anyway)."""


def schema_of(record, schema, fields: Fields):
    """The schema a row is read with: `schema`, or for auto the first whose field it has."""
    if not isinstance(record, dict):
        raise SampleError(f"a sample must be a JSON object, got {type(record).__name__}")
    if schema != "auto":
        return schema
    for name, key in (("messages", fields.messages), ("sharegpt", fields.conversations),
                      ("prompt_response", fields.prompt), ("alpaca", "instruction")):
        if record.get(key) is not None:  # a table holds None where a row lacks the field
            return name
    found = ", ".join(map(repr, list(record)[:8])) or "none"
    raise SampleError(f"no schema's fields (it has {found}; expected {fields.messages!r}, {fields.conversations!r}, "
                      f"{fields.prompt!r} / {fields.response!r} or 'instruction' / 'output'): name them with "
                      f"--schema and --messages-key, --prompt-key, --response-key", "no schema's fields")


def to_messages(record, schema, fields: Fields):
    """(the chat of one row, the schema it was read with)."""
    schema = schema_of(record, schema, fields)
    if schema == "messages":
        return _messages(record, fields.messages, "role", "content", None), schema
    if schema == "sharegpt":
        messages = _messages(record, fields.conversations, "from", "value", SHAREGPT_ROLES)
        return _with_system(record, "system", messages), schema
    if schema == "alpaca":
        instruction, extra = _text(record, "instruction"), record.get("input") or ""
        if not isinstance(extra, str):
            raise SampleError(f"field 'input' must be a string, got {type(extra).__name__}")
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return _with_system(record, "system", _pair(prompt, _text(record, "output"), "output")), schema
    messages = _pair(_text(record, fields.prompt), _text(record, fields.response), fields.response)
    return _with_system(record, fields.system, messages), schema


def _text(record, key):
    if key not in record:
        raise SampleError(f"missing field {key!r}")
    value = record[key]
    if value is None:
        raise SampleError(f"field {key!r} is null", f"null {key!r}")
    if not isinstance(value, str):
        raise SampleError(f"field {key!r} must be a string, got {type(value).__name__}")
    return value


def _pair(prompt, response, response_key):
    if not response.strip():
        raise SampleError(f"empty response in field {response_key!r}")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def _with_system(record, key, messages):
    if key and record.get(key) and messages[0]["role"] != "system":
        return [{"role": "system", "content": _text(record, key)}, *messages]
    return messages


def _messages(record, key, role_key, content_key, role_names):
    """A list of turns with role_key / content_key, roles renamed by role_names (None: as they are)."""
    turns = record.get(key)
    if not isinstance(turns, list) or not turns:
        raise SampleError(f"field {key!r} must be a non-empty list of messages", f"{key!r} not a non-empty list")
    known = ROLES if role_names is None else tuple(role_names)
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise SampleError(f"message {i} must be an object with {role_key!r} and {content_key!r}",
                              f"a message without {role_key!r} and {content_key!r}")
        role = turn[role_key] if role_names is None else role_names.get(turn[role_key])
        if role not in ROLES:
            raise SampleError(f"message {i}: unknown role {turn[role_key]!r} (known: {', '.join(known)})",
                              "unknown role")
        content = turn[content_key]
        if not isinstance(content, str):
            raise SampleError(f"message {i}: content must be a string", "content that is not a string")
        if role == "assistant":
            if not content.strip():
                raise SampleError(f"message {i}: empty assistant response", "empty assistant response")
            reasoning = _reasoning(turn, i)
            if reasoning is not None:
                messages.append({"role": role, "content": content, "reasoning": reasoning})
                continue
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        raise SampleError("no assistant message: nothing to learn")
    return messages


def _reasoning(turn, index):
    """The reasoning field of an assistant turn (None: none, or an empty one)."""
    present = [name for name in REASONING_FIELDS if turn.get(name) is not None and turn.get(name) != ""]
    if not present:
        return None
    values = [turn[name] for name in present]
    for name, value in zip(present, values):
        if not isinstance(value, str):
            raise SampleError(f"message {index}: field {name!r} must be a string, got {type(value).__name__}",
                              "a reasoning field that is not a string")
    if len(set(values)) > 1:
        raise SampleError(f"message {index}: different reasoning in fields {', '.join(map(repr, present))}",
                          "different reasoning in two fields")
    return values[0] if values[0].strip() else None

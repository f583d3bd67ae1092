"""JSON lines read with errors that name the file and line."""

import json


def read_jsonl(path, parse, limit=None):
    """[parse(record) for each non-blank line] (the first `limit`). A malformed line, a missing
    field (KeyError) or a value parse rejects (ValueError, TypeError) raises ValueError("path:line: ...")."""
    values = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err.msg})") from None
            try:
                values.append(parse(record))
            except (ValueError, KeyError, TypeError) as err:
                detail = f"missing field {err}" if isinstance(err, KeyError) else str(err)
                raise ValueError(f"{path}:{line_no}: {detail}") from None
            if limit and len(values) == limit:
                break
    if not values:
        raise ValueError(f"{path}: no records")
    return values

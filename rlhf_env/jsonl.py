"""JSON Lines files: validated reading that names the file, line and field of any problem; atomic writing.

Every file a user can hand us (prompts, demonstrations, preference pairs) goes through `iter_jsonl`, so a bad
file fails at once with a `ValueError` that says where, before any model runs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from rlhf_env.files import atomic_write

_TYPE_NAMES = {str: "string", list: "list", dict: "object", int: "integer", float: "number"}


def iter_jsonl(path: str | os.PathLike, fields: dict[str, type]) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, record)`` for every non-blank line, checking that it holds `fields` of their types.

    Raises:
        ValueError: for text that is not UTF-8, a line that is not a JSON object, or a missing or mistyped field;
            the message starts with ``"{path}, line {n}:"``.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err})") from err
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
        for field, kind in fields.items():
            if field not in record:
                raise ValueError(f"{where}: missing the {field!r} field")
            if not isinstance(record[field], kind):
                raise ValueError(f"{where}: the {field!r} field must be a {_TYPE_NAMES.get(kind, kind.__name__)}, "
                                 f"got {type(record[field]).__name__}")
        yield number, record


def read_jsonl(path: str | os.PathLike, fields: dict[str, type]) -> list[dict]:
    """All records of a JSONL file, validated by `iter_jsonl`; an empty file is a `ValueError` too."""
    records = [record for _, record in iter_jsonl(path, fields)]
    if not records:
        raise ValueError(f"{path} holds no records")
    return records


def dumps_jsonl(records: list[dict]) -> str:
    """The exact text `write_jsonl` writes (one compact JSON object per line)."""
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records atomically (`rlhf_env.files.atomic_write`): a crash leaves either the old file or the whole
    new one, never half."""
    atomic_write(path, dumps_jsonl(records))  # serialised first: an unserialisable record writes nothing

"""The configuration table of docs/usage.md, generated from the dataclasses in schema.py.

`python -m anoddpm.config.reference` prints it; a test checks docs/usage.md holds exactly this text,
so the documentation cannot drift from the code. Descriptions are the fields' trailing comments
(or the section's docstring when a field has none).
"""
from __future__ import annotations

import inspect
import json
import re
from dataclasses import fields

from anoddpm.config import Config

_FIELD_LINE = re.compile(r"^\s+(\w+): [^=]+= .*?(?:#\s*(?P<comment>.*))?$")


def _comments(cls: type) -> dict[str, str]:
    out = {}
    for line in inspect.getsource(cls).splitlines():
        match = _FIELD_LINE.match(line)
        if match:
            out[match.group(1)] = (match.group("comment") or "").strip()
    return out


def reference_markdown() -> str:
    """Markdown table: `section.field` | default | description, for every field of Config."""
    rows = ["| field | default | description |", "|---|---|---|"]
    default = Config()
    for section in fields(Config):
        obj = getattr(default, section.name)
        comments = _comments(type(obj))
        for f in fields(obj):
            value = json.dumps(getattr(obj, f.name))
            text = comments.get(f.name, "").replace("|", "\\|")
            rows.append(f"| `{section.name}.{f.name}` | `{value}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(reference_markdown())

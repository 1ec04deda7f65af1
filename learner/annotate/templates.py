"""Judge prompt templates: files an operator can edit, filled with delimited data.

Generations and prompts are data, not instructions: they are placed between markers, and any
marker text inside them is defused first, so a generation cannot close its block and speak to
the judge in the template's voice.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
_PLACEHOLDER = re.compile(r"\{(\w+)\}")
_MARKER = re.compile(r"</?\s*(request|response(_[ab])?)\s*>", re.IGNORECASE)


def load_template(mode: str, path: Path | None = None) -> str:
    """The template for ``mode`` from ``path`` if given, else the shipped default."""
    return (path or TEMPLATE_DIR / f"{mode}.txt").read_text()


def defuse(text: str) -> str:
    """Neutralise marker tags inside data (``</response>`` -> ``[/response]``)."""
    return _MARKER.sub(lambda m: "[" + m.group(0)[1:-1] + "]", text)


def fill(template: str, **fields: str) -> str:
    """Substitute ``{name}`` fields; data fields are defused. Unknown braces are left alone.

    One pass over the template: text that a field brings in is never searched for placeholders
    again, so a prompt holding ``{response}`` cannot pull another field into its block."""

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in fields:
            return m.group(0)
        return defuse(fields[name]) if name in _DATA else fields[name]

    return _PLACEHOLDER.sub(value, template)


_DATA = {"prompt", "response", "response_a", "response_b"}

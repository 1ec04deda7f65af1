"""Judge prompt templates: files an operator can edit, filled with delimited data.

Generations and prompts are data, not instructions: they are placed between markers, and any
marker text inside them is defused first, so a generation cannot close its block and speak to
the judge in the template's voice.
"""

from __future__ import annotations

import re
from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent / "templates"
_MARKER = re.compile(r"</?\s*(request|response(_[ab])?)\s*>", re.IGNORECASE)


def load_template(mode: str, path: Path | None = None) -> str:
    """The template for ``mode`` from ``path`` if given, else the shipped default."""
    return (path or TEMPLATE_DIR / f"{mode}.txt").read_text()


def defuse(text: str) -> str:
    """Neutralise marker tags inside data (``</response>`` -> ``[/response]``)."""
    return _MARKER.sub(lambda m: "[" + m.group(0)[1:-1] + "]", text)


def fill(template: str, **fields: str) -> str:
    """Substitute ``{name}`` fields; data fields are defused. Unknown braces are left alone."""
    out = template
    for name, value in fields.items():
        out = out.replace("{" + name + "}", defuse(value) if name in _DATA else value)
    return out


_DATA = {"prompt", "response", "response_a", "response_b"}

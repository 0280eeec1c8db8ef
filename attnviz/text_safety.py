"""Text from a file, made safe to show: on a terminal, in Rich markup, in HTML and inline JSON.

Tensor names, dict keys, global names and config values come from strangers. Printed raw they
can move the cursor or erase lines (terminal escapes), restyle or crash Rich output (``[/]``),
end a ``<script>`` block, or fail to print at all (a 5000-digit integer has no ``str`` in
Python 3.11). Every place that shows file text goes through one of these functions.
"""

from __future__ import annotations

import html
import json
import re
from pathlib import PurePath
from typing import Any

# C0 and C1 controls, DEL, and the bidi / zero-width / line-separator format characters that
# reorder or hide text on a terminal. Tab and newline are escaped too: file text is one line.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069\ufeff]")
_MAX_INT_DIGITS = 40  # shown in full below this; larger integers are described by their size
_RICH_BRACKET = re.compile(r"(\\*)\[")
_RICH_TAG = re.compile(r"\[[a-z#/@][^[]*?]")  # rich.markup.RE_TAGS


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group(0))
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def terminal(text: str, limit: int | None = None) -> str:
    """``text`` with every control or format character written as a visible ``\\xNN``."""
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return _UNSAFE.sub(_escape_char, text)


def rich_markup(text: str, limit: int | None = None) -> str:
    """``text`` for a Rich markup string: terminal-safe, every ``[`` shown as itself.

    Rich reads ``\\*[tag]`` as a tag (an odd number of backslashes escapes it) and drops one
    backslash before any other ``[``; trailing backslashes are doubled for a tag that follows.
    """
    safe = terminal(text, limit)

    def escape(match: re.Match[str]) -> str:
        run = len(match.group(1))
        if _RICH_TAG.match(safe, match.end() - 1):
            return "\\" * (2 * run + 1) + "["
        return "\\" * (run + 1) + "[" if run else "["

    escaped = _RICH_BRACKET.sub(escape, safe)
    return escaped + "\\" * (len(escaped) - len(escaped.rstrip("\\")))


def int_text(value: int) -> str:
    """An integer as text, whatever its size (``str`` refuses over 4300 digits)."""
    if -10**_MAX_INT_DIGITS < value < 10**_MAX_INT_DIGITS:
        return str(value)
    return f"<{'-' if value < 0 else ''}{value.bit_length()}-bit integer>"


def safe_repr(value: Any, limit: int = 80, depth: int = 0) -> str:
    """A short ``repr`` that never raises (huge integers, deep nesting, hostile ``__repr__``)."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        return int_text(value)
    if isinstance(value, str | bytes | bytearray):
        text = repr(value[:limit])
    elif isinstance(value, tuple | list) and depth >= 4:
        text = "(…)" if isinstance(value, tuple) else "[…]"
    elif isinstance(value, tuple | list):
        inner = ", ".join(safe_repr(v, limit, depth + 1) for v in value[:8])
        inner += ", …" if len(value) > 8 else "," if len(value) == 1 and \
            isinstance(value, tuple) else ""
        text = f"({inner})" if isinstance(value, tuple) else f"[{inner}]"
    elif isinstance(value, float | complex):
        text = repr(value)
    else:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[:limit] + "…"


def safe_str(value: Any, limit: int | None = None) -> str:
    """``str`` of a dict key or name from a file, never raising; strings are returned as is."""
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        return value if limit is None or len(value) <= limit else value[:limit] + "…"
    if isinstance(value, int) and not isinstance(value, bool):
        return int_text(value)
    return safe_repr(value, limit or 200)


def html_text(text: str) -> str:
    """Text for an HTML element or attribute."""
    return html.escape(text, quote=True)


def script_json(document: Any) -> str:
    """JSON to inline in ``<script>``: ``<``, ``>``, ``&`` and U+2028/9 as ``\\u`` escapes.

    Inside a script element the HTML tokenizer still looks for ``</script``, and ``<!--``
    followed by ``<script`` switches it to the "double-escaped" state that swallows the rest of
    the page. With no ``<`` in the block at all, neither can happen; the JSON value is unchanged.
    """
    text = json.dumps(document, separators=(",", ":"), ensure_ascii=True)
    for char in "<>&\u2028\u2029":
        text = text.replace(char, f"\\u{ord(char):04x}")
    return text

"""JSON from files (safetensors headers, config.json, shard indexes, split sidecars), parsed
with integers bounded to 64 bits: Python refuses to convert integers over 4300 digits (a
ValueError, not a JSONDecodeError), and no field attnviz reads is meant to be larger."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

MAX_INT_DIGITS = 20  # 2**64 has 20 digits


class JsonTextError(ValueError):
    """The text is not JSON attnviz accepts; ``str`` is a predicate ('is not JSON (...)')."""


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise JsonTextError(f"holds an integer of {len(text.lstrip('-'))} digits (over 64 bits)")
    return int(text)


def parse_json(text: str | bytes,
               object_pairs_hook: Callable[[list[tuple[str, Any]]], Any] | None = None) -> Any:
    """``json.loads`` with 64-bit integers; raises JsonTextError (or the hook's own error)."""
    try:
        if isinstance(text, bytes):  # UTF-8 only (a BOM allowed), never guessed
            text = text.decode("utf-8-sig")
        return json.loads(text, parse_int=_bounded_int, object_pairs_hook=object_pairs_hook)
    except JsonTextError:
        raise
    except UnicodeDecodeError as exc:
        raise JsonTextError("is not UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise JsonTextError(f"is not JSON ({exc.msg} at line {exc.lineno} column {exc.colno})"
                            ) from exc
    except RecursionError as exc:
        raise JsonTextError("nests too deeply") from exc
    except ValueError as exc:  # e.g. a float literal Python cannot convert
        raise JsonTextError(f"is not JSON ({str(exc)[:100]})") from exc

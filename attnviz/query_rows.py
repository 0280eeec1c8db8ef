"""Which query rows to show: the grammar of ``--query`` for sequences and DETR.

Comma-separated terms: ``last`` (the final row), an index (negative counts from the end), or an
inclusive range ``a-b``. Rows are resolved against each layer's own row count, so ``last`` is
every layer's last row, decoder and cross-attention included.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from attnviz.errors import UsageError

_TERM = re.compile(r"last|-?\d+|\d+-\d+")


def parse_query_rows(text: str) -> list[tuple[int, int]]:
    """Terms as inclusive (start, stop) pairs in row indices, negatives counting from the end."""
    terms = [t.strip().lower() for t in text.split(",")]
    out: list[tuple[int, int]] = []
    for term in terms:
        if not _TERM.fullmatch(term):
            raise UsageError(f"'{term}' is not a query row: use last, an index (e.g. -2), a "
                             "range a-b or a comma list", param="query")
        if term == "last":
            out.append((-1, -1))
        elif "-" in term[1:]:
            start, stop = (int(v) for v in term.split("-"))
            if stop < start:
                raise UsageError(f"range '{term}' is reversed: write '{stop}-{start}'",
                                 param="query")
            out.append((start, stop))
        else:
            out.append((int(term), int(term)))
    return out


def query_rows(text: str) -> Callable[[int], list[int]]:
    """A function of a layer's row count giving the rows ``text`` selects, in order."""
    terms = parse_query_rows(text)

    def rows(length: int) -> list[int]:
        chosen: list[int] = []
        for start, stop in terms:
            first, last = (start + length if start < 0 else start,
                           stop + length if stop < 0 else stop)
            if not 0 <= first <= last < length:
                raise UsageError(f"query rows {start}..{stop} are outside 0..{length - 1}",
                                 param="query")
            chosen += range(first, last + 1)
        return list(dict.fromkeys(chosen))

    return rows

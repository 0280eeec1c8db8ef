"""Layer and head selectors: one grammar for every command that picks layers or heads.

A selector is comma-separated terms, each one of

- an index, ``3``; a negative one counts from the end (``-1`` is the last),
- an inclusive range of indices, ``0-3`` (``-3--1``: the last three),
- a layer's exact name, ``encoder.layers.0.self_attn``,
- a glob on the full name (``*``, ``?``, ``[...]``, as in ``fnmatch``), ``encoder.*``,

or the whole text ``all`` (every layer) or, where the caller can draw it, ``mean``. Resolving
keeps the order the terms give and drops repeats. Heads have no names: indices and ranges only.

Indices count layers in the order ``attnviz inspect`` lists them (``natural_order`` when a file
stores its keys sorted as text), and commands that capture maps order them the same way
(``order_like``), so ``--layer 3`` is one layer in every command.

Pure: no torch, no CLI. Errors are ``UsageError`` naming the parameter (``param``); the CLI
turns that into its flag.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Literal

from attnviz.errors import UsageError, did_you_mean

ALL = "all"
MEAN = "mean"
GLOB_CHARS = frozenset("*?[")
SHOWN = (5, 3)  # an error lists the first 5 and the last 3 of a long list of layers
NAME_CHARS = 120  # of one name in an error line

_INDEX = re.compile(r"-?\d+")
_RANGE = re.compile(r"(-?\d+)-(-?\d+)")

Kind = Literal["index", "range", "name", "glob"]


@dataclass(frozen=True)
class Term:
    """One comma-separated part of a selector: ``first`` (and ``last``) for indices and ranges."""

    kind: Kind
    text: str
    first: int = 0
    last: int = 0


@dataclass(frozen=True)
class Selector:
    """A parsed selector: ``keyword`` is ``all`` or ``mean`` (and ``terms`` empty), or None."""

    text: str
    terms: tuple[Term, ...] = ()
    keyword: str | None = None

    @property
    def mean(self) -> bool:
        return self.keyword == MEAN


def _grammar(noun: str, by_name: bool, allow_mean: bool) -> str:
    kinds = "an index, a range like 0-3" + (", a name, a glob" if by_name else "")
    return f"{noun}s are chosen by {kinds}, a comma list or 'all'" + \
        (" or 'mean'" if allow_mean else "")


def parse(text: str, *, param: str = "layer", noun: str = "layer", allow_mean: bool = False,
          by_name: bool = True) -> Selector:
    """Parse ``text``; raises ``UsageError`` (``param``) for text that can select nothing."""
    grammar = _grammar(noun, by_name, allow_mean)
    stripped = text.strip()
    if not stripped:
        raise UsageError(f"empty selection: {grammar}", param=param)
    keyword = stripped.lower()
    if keyword in (ALL, MEAN):
        if keyword == MEAN and not allow_mean:
            raise UsageError(f"'mean' is not a choice here: {grammar}", param=param)
        return Selector(stripped, keyword=keyword)
    terms = []
    for part in stripped.split(","):
        part = part.strip()
        if not part:
            raise UsageError(f"'{stripped}' has an empty term between commas", param=param)
        terms.append(_term(part, param=param, noun=noun, by_name=by_name, grammar=grammar))
    return Selector(stripped, tuple(terms))


def _term(part: str, *, param: str, noun: str, by_name: bool, grammar: str) -> Term:
    if part.lower() in (ALL, MEAN):
        raise UsageError(f"'{part}' stands alone, not in a list", param=param)
    if _INDEX.fullmatch(part):
        return Term("index", part, int(part), int(part))
    if match := _RANGE.fullmatch(part):
        first, last = int(match.group(1)), int(match.group(2))
        if (first < 0) == (last < 0) and first > last:
            raise UsageError(f"range '{part}' is reversed: write '{last}-{first}'", param=param)
        return Term("range", part, first, last)
    if not by_name or re.fullmatch(r"[-\d\s]+", part):
        raise UsageError(f"'{part}' is not an index or a range like 0-3 ({grammar})",
                         param=param)
    return Term("glob" if GLOB_CHARS & set(part) else "name", part)


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[:NAME_CHARS - 1] + "…"


def listing(names: Sequence[str], indices: Sequence[int] | None = None) -> str:
    """'0 a, 1 b, …, 11 z': names with their indices, a long list cut to its first and last
    few (``indices``: which of ``names`` to list, default all)."""
    chosen = list(range(len(names))) if indices is None else list(indices)
    head, tail = SHOWN
    shown = [f"{i} {_short(names[i])}" for i in chosen]
    if len(shown) > head + tail + 1:
        shown = [*shown[:head], f"… ({len(chosen)} in all)", *shown[-tail:]]
    return ", ".join(shown)


def _count_text(count: int, noun: str) -> str:
    if count == 0:
        return f"there are no {noun}s"
    if count == 1:
        return f"there is 1 {noun} (0, or -1)"
    return f"there are {count} {noun}s ({0}-{count - 1}, or -{count} to -1)"


def _index(value: int, count: int, part: str, *, param: str, noun: str) -> int:
    resolved = value + count if value < 0 else value
    if not 0 <= resolved < count:
        where = "" if part == str(value) else f" in '{part}'"
        raise UsageError(f"{noun} {value}{where} is out of range: {_count_text(count, noun)}",
                         param=param)
    return resolved


def resolve(selector: Selector, names: Sequence[str], *, param: str = "layer",
            noun: str = "layer", aliases: Sequence[str | None] = (),
            also: Collection[str] = ()) -> list[int]:
    """Indices into ``names`` that ``selector`` picks, in its order, without repeats (``mean``
    and ``all``: every index).

    ``aliases``: another name for each of ``names`` (or None) that names and globs also match
    (the checkpoint's name of a module the model calls differently). ``also``: other names a
    name or glob term may match without picking a layer (tensors, for ``inspect``); a term that
    matches neither raises ``UsageError``, as does an index out of range."""
    count = len(names)
    if selector.keyword is not None:
        if count == 0:
            raise UsageError(f"nothing to select: {_count_text(0, noun)}", param=param)
        return list(range(count))
    chosen: dict[int, None] = {}  # an ordered set
    for term in selector.terms:
        for index in _term_indices(term, names, param=param, noun=noun, aliases=aliases,
                                   also=also):
            chosen.setdefault(index)
    return list(chosen)


def _term_indices(term: Term, names: Sequence[str], *, param: str, noun: str,
                  aliases: Sequence[str | None], also: Collection[str]) -> list[int]:
    count = len(names)
    if term.kind == "index":
        return [_index(term.first, count, term.text, param=param, noun=noun)]
    if term.kind == "range":
        first = _index(term.first, count, term.text, param=param, noun=noun)
        last = _index(term.last, count, term.text, param=param, noun=noun)
        if first > last:  # only a range with one negative end gets here
            raise UsageError(f"range '{term.text}' is reversed ({noun} {first} to {last}): "
                             f"write '{term.last}-{term.first}'", param=param)
        return list(range(first, last + 1))
    alias = list(aliases) + [None] * (count - len(aliases))

    def hit(name: str | None) -> bool:
        if name is None:
            return False
        return name == term.text if term.kind == "name" else fnmatch.fnmatchcase(name,
                                                                                 term.text)

    found = [i for i in range(count) if hit(names[i]) or hit(alias[i])]
    if found or any(hit(name) for name in also):
        return found
    known = [*names, *(a for a in alias if a)]
    kinds = f"{noun} or tensor" if also else noun
    what = f"no {kinds} is named '{term.text}'" if term.kind == "name" else \
        f"'{term.text}' matches no {kinds}"
    hint = did_you_mean(term.text, known, "")
    if count:
        hint = f"{hint + ' ' if hint else ''}{noun}s: {listing(names)}"
    raise UsageError(what, param=param, hint=hint or f"{_count_text(0, noun)}")


def select(text: str, names: Sequence[str], *, param: str = "layer", noun: str = "layer",
           allow_mean: bool = False, aliases: Sequence[str | None] = ()) -> list[int] | None:
    """``parse`` and ``resolve`` in one: indices into ``names``, or None for ``mean``."""
    selector = parse(text, param=param, noun=noun, allow_mean=allow_mean)
    indices = resolve(selector, names, param=param, noun=noun, aliases=aliases)
    return None if selector.mean else indices


def select_heads(text: str, count: int, *, param: str = "head",
                 allow_mean: bool = True) -> list[int] | None:
    """Head indices (heads have no names), or None for ``mean``."""
    selector = parse(text, param=param, noun="head", allow_mean=allow_mean, by_name=False)
    indices = resolve(selector, [str(h) for h in range(count)], param=param, noun="head")
    return None if selector.mean else indices


def select_among(text: str | None, names: Sequence[str], eligible: Collection[str], *,
                 what: str, param: str = "layer", allow_mean: bool = False,
                 aliases: Sequence[str | None] = ()) -> list[int] | None:
    """Like ``select``, for a figure that can only draw some of the layers (``eligible``, in
    ``what`` words: "decoder cross-attention layers"): indices still count every layer of
    ``names``; ``all``, ``mean`` and globs keep the eligible ones, an index or a name of
    another layer is refused with the list to choose from. ``text`` None: the last eligible."""
    allowed = [i for i, name in enumerate(names) if name in eligible]
    if not allowed:
        raise UsageError(f"none of the {len(names)} layers is one of the {what}", param=param)
    if text is None:
        return [allowed[-1]]
    selector = parse(text, param=param, allow_mean=allow_mean)
    if selector.keyword is not None:
        return None if selector.mean else allowed
    chosen: dict[int, None] = {}
    for term in selector.terms:
        found = _term_indices(term, names, param=param, noun="layer", aliases=aliases, also=())
        fits = [i for i in found if i in allowed]
        if not fits or (term.kind != "glob" and len(fits) < len(found)):
            bad = next(i for i in found if i not in allowed)
            raise UsageError(f"layer {bad} ({_short(names[bad])}) is not one of the {what}",
                             param=param, hint=f"{what}: {listing(names, allowed)}")
        for index in fits:
            chosen.setdefault(index)
    return list(chosen)


def compact(indices: Sequence[int]) -> str:
    """The shortest selector text for ``indices`` (non-negative, in this order): runs of
    consecutive ascending indices become ranges, '0-3,7'."""
    parts: list[str] = []
    start = 0
    for pos in range(1, len(indices) + 1):
        if pos == len(indices) or indices[pos] != indices[pos - 1] + 1:
            first, last = indices[start], indices[pos - 1]
            parts.append(str(first) if first == last else f"{first}-{last}")
            start = pos
    return ",".join(parts)


# where a file sorts its keys as text, these words of a name put the parts of a model in the
# order they run: the encoder before the decoder, a layer's self-attention before its
# cross-attention (nn.Transformer, BART, Whisper, DETR, T5 names)
RUNS_FIRST = frozenset({"encoder", "self_attn", "SelfAttention"})
RUNS_LAST = frozenset({"decoder", "encoder_attn", "multihead_attn", "cross_attn",
                       "crossattention", "EncDecAttention"})


def natural_key(name: str) -> tuple[tuple[int, tuple[str | int, ...]], ...]:
    """Sort key, dot-separated part by part: digit runs compare as numbers (``layers.2``
    before ``layers.10``), ``RUNS_FIRST`` words before other words before ``RUNS_LAST`` ones.

    ``re.split`` with a group alternates text and digits, so the same position always holds
    the same type and keys compare without mixing str and int."""
    key = []
    for part in name.split("."):
        rank = 0 if part in RUNS_FIRST else 2 if part in RUNS_LAST else 1
        pieces = re.split(r"(\d+)", part)
        key.append((rank, tuple(int(p) if i % 2 else p for i, p in enumerate(pieces))))
    return tuple(key)


def natural_order(names: Sequence[str]) -> list[int]:
    """Positions of ``names`` in the order to list them: as given, unless the given order is
    exactly text order (safetensors sorts its keys), which says nothing about the model: then
    by ``natural_key``."""
    order = list(range(len(names)))
    if list(names) == sorted(names):
        order.sort(key=lambda i: (natural_key(names[i]), names[i]))
    return order


def _base(name: str) -> str:
    return name.split("#")[0]  # 'layer#2': the second call of 'layer'


def order_like(names: Sequence[str], reference: Sequence[str]) -> tuple[list[str],
                                                                       list[str | None]]:
    """``names`` (captured modules, in call order) in the order of ``reference`` (the
    checkpoint's layers, as ``inspect`` lists them), and for each its reference name (or None).

    A name matches the reference name it equals, or one that ends with it after a dot (or the
    other way round: a model loaded without the checkpoint's ``bert.`` prefix); repeated calls
    (``name#2``) follow their first call; names that match none keep their call order, after
    the rest. With every layer captured once, index i is the reference's index i."""
    rank = {name: i for i, name in enumerate(reference)}

    def match(name: str) -> str | None:
        base = _base(name)
        if base in rank:
            return base
        fits = [r for r in reference if r.endswith("." + base) or base.endswith("." + r)]
        return fits[0] if len(fits) == 1 else None

    matched = [match(n) for n in names]
    unmatched = len(reference)  # after every reference layer

    def key(i: int) -> tuple[int, int]:
        found = matched[i]
        return (unmatched if found is None else rank[found]), i

    positions = sorted(range(len(names)), key=key)
    return [names[i] for i in positions], [matched[i] for i in positions]

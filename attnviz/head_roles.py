"""Head roles: each a declared score (one statistic of ``attnviz.head_stats``) and threshold.

A head holds every role whose score reaches its threshold, so it can hold several or none; its
top role is the held role with the largest score over threshold ratio. Scores are averages over
the query rows of the inputs given (and of the probe for probe roles), so they are in [0, 1]
except where said. Changing a threshold here changes the docs (docs/heads.md is generated from
this table by ``roles_markdown``, and tests/test_head_atlas.py keeps them equal) and the JSON
(``role_definitions``: each role with its score, the score's definition and the threshold).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Role:
    name: str
    statistic: str  # the key in LayerStats.values
    threshold: float
    meaning: str
    probe: str | None = None  # the token probe the score needs, if any
    short: str = ""  # three letters for tables and figure cells


ROLES: tuple[Role, ...] = (
    Role("sink", "first", 0.5, "at least half of each row's mass on the first token "
         "(BOS, CLS or an attention sink)", short="snk"),
    Role("previous-token", "previous", 0.5, "at least half of the mass on the token just before",
         short="prv"),
    Role("next-token", "next", 0.5, "at least half of the mass on the token just after "
         "(bidirectional models only)", short="nxt"),
    Role("self", "self", 0.5, "at least half of the mass on the query's own token", short="slf"),
    Role("local", "local", 0.8, "at least 80% of the mass within the local window (+-w tokens), "
         "where no narrower role explains it", short="loc"),
    Role("broad", "entropy_norm", 0.9, "entropy at least 90% of the uniform distribution's over "
         "the keys each query may see", short="brd"),
    Role("induction", "induction", 0.4, "on a repeated block of random tokens, at least 40% of "
         "the mass of the second copy on the token after the earlier occurrence",
         probe="induction", short="ind"),
    Role("duplicate-token", "duplicate", 0.4, "on a repeated block of random tokens, at least "
         "40% of the mass of the second copy on the earlier copy of the same token",
         probe="duplicate", short="dup"),
)
# the probes' statistics, defined like attnviz.head_stats.DEFINITIONS (T: the block length,
# s: where the first copy starts)
PROBE_DEFINITIONS = {
    "induction": "p_i(i-T+1) over the second copy's rows s+T <= i < s+2T: the token after the "
                 "earlier occurrence of token i",
    "duplicate": "p_i(i-T) over the second copy's rows s+T <= i < s+2T: the earlier occurrence "
                 "of token i itself",
}
ROLES_BY_NAME = {role.name: role for role in ROLES}
# Okabe-Ito (and Tol's wine): told apart with the common colour-vision deficiencies; the atlas
# figure, the terminal table and the HTML report all use these
ROLE_COLOURS = {"sink": "#0072B2", "previous-token": "#D55E00", "next-token": "#E69F00",
                "self": "#009E73", "local": "#F0E442", "broad": "#999999",
                "induction": "#CC79A7", "duplicate-token": "#882255"}
MIN_INTENSITY = 0.35  # a score at its threshold: the role's colour this much over white
NARROWER_THAN_LOCAL = ("previous-token", "next-token", "self")


@dataclass(frozen=True)
class HeadRoles:
    """One head's role scores (NaN where its statistic is undefined) and the roles it holds."""

    scores: dict[str, float]
    held: tuple[str, ...]

    @property
    def top(self) -> str | None:
        if not self.held:
            return None
        return max(self.held, key=lambda n: self.scores[n] / ROLES_BY_NAME[n].threshold)


def assign_roles(values: Mapping[str, torch.Tensor]) -> list[HeadRoles]:
    """Roles of every head of one layer from its statistics ``values[stat]`` (H,)."""
    heads = next(iter(values.values())).numel()
    out = []
    for head in range(heads):
        scores = {role.name: float(values[role.statistic][head])
                  for role in ROLES if role.statistic in values}
        held = [name for name, score in scores.items()
                if score == score and score >= ROLES_BY_NAME[name].threshold]  # NaN never holds
        if "local" in held and any(n in held for n in NARROWER_THAN_LOCAL):
            held.remove("local")
        out.append(HeadRoles(scores, tuple(held)))
    return out


def role_definitions() -> list[dict[str, object]]:
    """Every role as plain data: its score (a statistic), what the score is, the threshold."""
    from attnviz.head_stats import DEFINITIONS

    definitions = {**DEFINITIONS, **PROBE_DEFINITIONS}
    return [{"name": role.name, "short": role.short, "score": role.statistic,
             "score_definition": definitions[role.statistic], "threshold": role.threshold,
             "meaning": role.meaning, "probe": role.probe} for role in ROLES]


def roles_markdown() -> str:
    """The roles table of docs/heads.md (a test keeps the page equal to it)."""
    lines = ["| role | short | score | threshold | holds when |", "|---|---|---|---|---|"]
    for role in ROLES:
        lines.append(f"| `{role.name}` | {role.short} | `{role.statistic}` | {role.threshold:g} "
                     f"| {role.meaning} |")
    return "\n".join(lines) + "\n"


def role_rgb(role: str | None, score: float) -> tuple[float, float, float] | None:
    """A head's colour: its top role's colour blended with white by how far the score is from
    the threshold (pale, ``MIN_INTENSITY``) to 1 (full colour); None for no role."""
    if role is None:
        return None
    threshold = ROLES_BY_NAME[role].threshold
    span = max(1e-9, 1.0 - threshold)
    strength = min(1.0, max(0.0, (score - threshold) / span)) if math.isfinite(score) else 0.0
    alpha = MIN_INTENSITY + (1.0 - MIN_INTENSITY) * strength
    code = ROLE_COLOURS[role]
    base = [int(code[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    red, green, blue = ((1.0 - alpha) + alpha * c for c in base)
    return red, green, blue


def hex_colour(rgb: tuple[float, float, float]) -> str:
    return "#" + "".join(f"{round(255 * c):02x}" for c in rgb)


def text_colour(rgb: tuple[float, float, float]) -> str:
    """Black or white, whichever reads on ``rgb`` (relative luminance)."""
    luminance = 0.2126 * rgb[0] + 0.7152 * rgb[1] + 0.0722 * rgb[2]
    return "black" if luminance > 0.5 else "white"

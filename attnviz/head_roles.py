"""Head roles: each a declared score (one statistic of ``attnviz.head_stats``) and threshold.

A head holds every role whose score reaches its threshold, so it can hold several or none; its
top role is the held role with the largest score over threshold ratio. Scores are averages over
the query rows of the inputs given (and of the probe for probe roles), so they are in [0, 1]
except where said. Changing a threshold here changes the docs (docs/heads.md is generated from
this table) and the JSON (each role carries its score name and threshold).
"""

from __future__ import annotations

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


ROLES: tuple[Role, ...] = (
    Role("sink", "first", 0.5, "at least half of each row's mass on the first token "
         "(BOS, CLS or an attention sink)"),
    Role("previous-token", "previous", 0.5, "at least half of the mass on the token just before"),
    Role("next-token", "next", 0.5, "at least half of the mass on the token just after "
         "(bidirectional models only)"),
    Role("self", "self", 0.5, "at least half of the mass on the query's own token"),
    Role("local", "local", 0.8, "at least 80% of the mass within the local window (+-w tokens), "
         "where no narrower role explains it"),
    Role("broad", "entropy_norm", 0.9, "entropy at least 90% of the uniform distribution's over "
         "the keys each query may see"),
    Role("induction", "induction", 0.4, "on a repeated block of random tokens, at least 40% of "
         "the mass of the second copy on the token after the earlier occurrence",
         probe="induction"),
    Role("duplicate-token", "duplicate", 0.4, "on a repeated block of random tokens, at least "
         "40% of the mass of the second copy on the earlier copy of the same token",
         probe="duplicate"),
)
ROLES_BY_NAME = {role.name: role for role in ROLES}
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

"""Decision statistics per tenant and model, from counts of stored turns by path and reason."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from service.domain.policy import Path, Reason


@dataclass(slots=True)
class DecisionCount:
    tenant: str
    model: str
    path: str
    reason: str
    turns: int
    prompt_tokens: int
    cached_tokens: int
    bytes_sent: int


@dataclass(slots=True)
class Summary:
    """One tenant and model (or the total, with both None)."""

    tenant: str | None
    model: str | None
    turns: int = 0
    reused: int = 0  # turns that continued a handle (cache_ref or affinity)
    fallbacks: int = 0  # cache references the backend refused, resent in full
    prompt_tokens: int = 0
    cached_tokens: int = 0
    bytes_sent: int = 0
    decisions: dict[str, int] = field(default_factory=dict)

    @property
    def hit_rate(self) -> float | None:
        """Reused turns over turns that had a parent to reuse."""
        eligible = self.turns - self.decisions.get(f"{Path.FULL}; reason={Reason.NO_PARENT}", 0)
        return round(self.reused / eligible, 4) if eligible else None

    def add(self, count: DecisionCount) -> None:
        self.turns += count.turns
        if count.path != Path.FULL:
            self.reused += count.turns
        if count.reason.startswith(f"{Reason.BACKEND_MISS}:"):
            self.fallbacks += count.turns
        self.prompt_tokens += count.prompt_tokens
        self.cached_tokens += count.cached_tokens
        self.bytes_sent += count.bytes_sent
        label = f"{count.path}; reason={count.reason}"
        self.decisions[label] = self.decisions.get(label, 0) + count.turns


def summarize(counts: Iterable[DecisionCount]) -> tuple[Summary, list[Summary]]:
    """(the total, one summary per tenant and model)."""
    total = Summary(None, None)
    groups: dict[tuple[str, str], Summary] = {}
    for count in counts:
        total.add(count)
        key = (count.tenant, count.model)
        groups.setdefault(key, Summary(*key)).add(count)
    return total, list(groups.values())

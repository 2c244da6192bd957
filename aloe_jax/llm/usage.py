"""Token usage (and cost, given a price table) per LLM role."""

from __future__ import annotations

import dataclasses
import threading

from aloe_jax.core.config import StrictModel


class Price(StrictModel):
    """US dollars per million tokens."""

    input: float = 0.0
    output: float = 0.0


@dataclasses.dataclass
class RoleUsage:
    calls: int = 0
    cache_hits: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reused_prompt_tokens: int = 0  # of prompt_tokens: found in a session cache, not prefilled again


class UsageMeter:
    """Counts calls, cache hits and tokens per role; thread-safe. "tokens in" are the prompt tokens of the calls that
    ran; "prefilled" the part of them not found in a session cache (the compute actually spent reading prompts)."""

    def __init__(self, prices: dict[str, Price] | None = None):
        self.prices = prices or {}  # keyed by backend name (e.g. "openai:gpt-4o-mini")
        self.by_role: dict[str, RoleUsage] = {}
        self.backend_of: dict[str, str] = {}
        self._lock = threading.Lock()

    def record(self, role: str, backend: str, prompt_tokens: int, completion_tokens: int, cached: bool,
               reused_prompt_tokens: int = 0) -> None:
        """One call; `reused_prompt_tokens` of its prompt tokens were in a session cache (not prefilled)."""
        with self._lock:
            usage = self.by_role.setdefault(role, RoleUsage())
            self.backend_of[role] = backend
            usage.calls += 1
            usage.cache_hits += int(cached)
            if not cached:  # a cache hit costs nothing
                usage.prompt_tokens += prompt_tokens
                usage.completion_tokens += completion_tokens
                usage.reused_prompt_tokens += reused_prompt_tokens

    def cost(self, role: str) -> float | None:
        """Dollars spent by a role, or None without a price for its backend."""
        price = self.prices.get(self.backend_of.get(role, ""))
        if price is None:
            return None
        u = self.by_role[role]
        return (u.prompt_tokens * price.input + u.completion_tokens * price.output) / 1e6

    def table(self) -> str:
        """A plain-text table of usage per role."""
        rows = [("role", "backend", "calls", "cached", "tokens in", "prefilled", "tokens out", "cost $")]
        for role, u in sorted(self.by_role.items()):
            cost = self.cost(role)
            rows.append((role, self.backend_of[role], str(u.calls), str(u.cache_hits), str(u.prompt_tokens),
                         str(u.prompt_tokens - u.reused_prompt_tokens), str(u.completion_tokens),
                         "-" if cost is None else f"{cost:.4f}"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)

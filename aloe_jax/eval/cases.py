"""The ALOE evaluation cases: every eval profile paired with each of the first five eval personalities."""

from __future__ import annotations

import dataclasses

from aloe_jax.core.errors import ConfigError, DataError

ALOE_PROFILES = 20
ALOE_PERSONALITIES = 5  # the benchmark uses only the first five of the seven released eval personalities
ALOE_CASES = ALOE_PROFILES * ALOE_PERSONALITIES


@dataclasses.dataclass(frozen=True)
class EvalCase:
    """One simulated user: a profile (facts) and a personality (traits), with their indices in the eval pools."""

    case_id: str
    profile_index: int
    personality_index: int
    profile: str
    personality: str


def build_cases(profiles: list[str], personalities: list[str], n_cases: int = ALOE_CASES) -> list[EvalCase]:
    """The first `n_cases` cases in benchmark order: profile-major, so case i is profile i // 5 with personality
    i % 5 — a subset keeps whole profiles, each met with all five personalities."""
    if not 1 <= n_cases <= ALOE_CASES:
        raise ConfigError(f"cases must be between 1 and {ALOE_CASES} (the ALOE set), got {n_cases}")
    if len(profiles) < ALOE_PROFILES or len(personalities) < ALOE_PERSONALITIES:
        raise DataError(f"the ALOE eval pools need {ALOE_PROFILES} profiles and {ALOE_PERSONALITIES} personalities, "
                        f"got {len(profiles)} and {len(personalities)}: point --aloe-data at the released files")
    cases = []
    for i in range(n_cases):
        p, q = divmod(i, ALOE_PERSONALITIES)
        cases.append(EvalCase(f"profile{p:02d}-personality{q}", p, q, profiles[p], personalities[q]))
    return cases


def load_cases(aloe_data: str | None, n_cases: int = ALOE_CASES) -> list[EvalCase]:
    """The ALOE cases from the released eval pools in `aloe_data` (local/gs:// folder, URL, or None: pinned repo)."""
    from aloe_jax.conversation.aloe_pools import load_pool

    return build_cases(load_pool("profile", "eval", aloe_data), load_pool("personality", "eval", aloe_data), n_cases)

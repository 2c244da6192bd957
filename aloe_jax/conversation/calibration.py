"""How far to trust a judge, measured: the same item judged twice with its options shown in another order.

Tree generation shows its pairwise judge replies A/B then B/A; the evaluation shows its score judge the 1–5 scale
listed forwards then backwards. From the pairs of verdicts: the *agreement rate* (share of items whose verdict is the
same in both orders) and the *first-shown rate* (share of all judgments, both orders, that chose the option shown
first — the position-bias rate). A judge is flagged as no better than position when its agreement is at most what
one choosing at random would reach (1 / number of options) or when its first-shown rate reaches a threshold. Items
with an undecided verdict in either order are left out.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Sequence


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Both-order agreement and position bias of a judge over `pairs` items (rates NaN when there are none)."""

    pairs: int
    agreement: float
    first_shown_rate: float
    chance_agreement: float  # 1 / number of options: a judge choosing at random
    max_first_shown_rate: float
    flagged: bool

    def line(self) -> str:
        """One line a reviewer reads: the numbers, and the flag when the judge is no better than position."""
        if self.pairs == 0:
            return "Judge calibration: no item was judged in both orders."
        numbers = (f"agreement over both orders {self.agreement:.2f} (chance {self.chance_agreement:.2f}), "
                   f"first-shown option chosen in {self.first_shown_rate:.2f} of judgments, {self.pairs} items")
        if self.flagged:
            return (f"**Judge flagged: no better than position** — {numbers} (flag: agreement ≤ chance or "
                    f"first-shown ≥ {self.max_first_shown_rate:.2f}).")
        return f"Judge calibration: {numbers}."

    def to_json(self) -> dict:
        return {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in dataclasses.asdict(self).items()} | {"line": self.line()}


def calibrate(pairs: Sequence[tuple[Hashable, bool, Hashable, bool]], n_options: int,
              max_first_shown_rate: float) -> Calibration:
    """The Calibration of `pairs`, each (verdict in the first order, whether it was the option shown first, verdict
    in the other order, same); a verdict None (undecided) drops its item."""
    decided = [p for p in pairs if p[0] is not None and p[2] is not None]
    chance = 1.0 / n_options
    if not decided:
        return Calibration(0, math.nan, math.nan, chance, max_first_shown_rate, False)
    agreement = sum(a == b for a, _, b, _ in decided) / len(decided)
    first = sum(int(fa) + int(fb) for _, fa, _, fb in decided) / (2 * len(decided))
    flagged = agreement <= chance or first >= max_first_shown_rate
    return Calibration(len(decided), agreement, first, chance, max_first_shown_rate, flagged)

"""The old reads the model check excused over a whole run, summarised per kind of fault."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from commons.testing.model_oracle import Model

__all__ = ["WindowLog", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` percentile (0..100) of ``values`` by nearest rank; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


@dataclass
class WindowLog:
    """Excused reads gathered over a whole run, summarised per kind of fault."""

    since_update: dict[str, list[float]] = field(default_factory=dict)
    since_fault_end: dict[str, list[float]] = field(default_factory=dict)
    faults: dict[str, int] = field(default_factory=dict)
    #: How long each fault lasted (start to healed: for a failover, until the promotion).
    fault_seconds: dict[str, list[float]] = field(default_factory=dict)
    #: Kinds of fault that are outages (open a window).
    outages: set[str] = field(default_factory=set)
    reads: int = 0
    examples: int = 0

    def add(self, model: Model) -> None:
        self.examples += 1
        self.reads += sum(1 for answer in model.answers if answer.method == "GET")
        for fault in model.faults:
            self.faults[fault.kind] = self.faults.get(fault.kind, 0) + 1
            self.fault_seconds.setdefault(fault.kind, []).append(fault.ended - fault.started)
            if fault.outage:
                self.outages.add(fault.kind)
        for excused in [*model.excused, *model.stale]:
            self.since_update.setdefault(excused.kind, []).append(excused.since_update)
            if excused.since_fault_end is not None:
                self.since_fault_end.setdefault(excused.kind, []).append(excused.since_fault_end)

    def lines(self) -> list[str]:
        """A small table: per kind, how many old reads were excused and how late they came."""
        out = [
            f"{self.examples} examples run (shrinking's included), {self.reads} reads; faults: "
            + (", ".join(f"{k} x{n}" for k, n in sorted(self.faults.items())) or "none")
        ]
        if self.fault_seconds:
            out.append(
                "faults lasted (max, ms): "
                + ", ".join(
                    f"{kind} {max(values) * 1000:.0f}"
                    + (" (outage: opens a window)" if kind in self.outages else " (no window)")
                    for kind, values in sorted(self.fault_seconds.items())
                )
            )
        if not self.since_update:
            out.append("no read older than an acknowledged update was excused")
            return out
        out.append(
            "excused old reads  | count | after the update: max / p99 (ms) "
            "| after the fault ended: max (ms)"
        )
        for kind in sorted(self.since_update):
            values = self.since_update[kind]
            ends = self.since_fault_end.get(kind, [])
            after_end = f"{max(ends) * 1000:.0f}" if ends else "-"
            out.append(
                f"{kind:<18} | {len(values):>5} | {max(values) * 1000:.0f} / "
                f"{percentile(values, 99) * 1000:.0f} | {after_end}"
            )
        return out

"""A run-level estimate of the time left: ``done k/N, ~M min left`` after each item of a long run."""

from __future__ import annotations

import time
from collections.abc import Callable


class TimeLeft:
    """Estimates the time left of a run of ``total`` items from the mean time per item computed so far.

    Items found done before (resumed from disk) count as done but not in the mean, so a resumed run
    does not look faster than it is. The estimate assumes the items left cost the mean of those computed.

    Args:
        total: number of items of the run.
        clock: seconds as a float (``time.perf_counter``; a fake one in tests).
    """

    def __init__(self, total: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.total = total
        self.clock = clock
        self.done = 0
        self.computed = 0
        self.seconds = 0.0
        self.last = clock()

    def step(self, computed: bool = True) -> str:
        """Count one more item done (``computed`` now, or found done before); return the progress line."""
        now = self.clock()
        self.done += 1
        if computed:
            self.computed += 1
            self.seconds += now - self.last
        self.last = now
        left = self.total - self.done
        if left <= 0 or not self.computed:
            return f"done {self.done}/{self.total}"
        return f"done {self.done}/{self.total}, ~{self.seconds / self.computed * left / 60:.1f} min left"

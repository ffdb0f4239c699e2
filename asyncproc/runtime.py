"""Process-wide runtime settings the supervisor and the workers share."""
from __future__ import annotations

import gc

#: Allocations between collections of the youngest generation (CPython's default: 700). Each
#: message allocates a few dozen short-lived objects, while thousands of long-lived ones are
#: held (10,000 requests in flight: their ledger entries, connections and attempts); at 700
#: the collector ran every few messages and kept walking the survivors. README: Performance.
GC_YOUNG_THRESHOLD = 50_000


def tune_gc() -> None:
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)

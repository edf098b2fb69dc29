"""Fault injection for the crash-safety test: `fault_point(name)` kills this process (SIGKILL, no clean-up,
as kill -9 or the OOM killer would) when $AIVOICE_FAULT names that point; otherwise it does nothing.

$AIVOICE_FAULT is `<point>` or `<point>@<n>` (the n-th time the point is reached, 1-based, counted in
this process). Production never sets it; the points are listed in docs/architecture.md ("Crash safety").
"""
from __future__ import annotations

import os
import signal
from collections import Counter

_seen: Counter[str] = Counter()


def fault_point(name: str) -> None:
    wanted = os.environ.get("AIVOICE_FAULT")
    if not wanted:
        return
    point, _, nth = wanted.partition("@")
    if point != name:
        return
    _seen[name] += 1
    if _seen[name] >= int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

"""Progress bars (tqdm) on stderr, shown only where a person watches: stderr is a terminal.

`AIVOICE_PROGRESS=0` (or off/false/no) turns them off everywhere, `AIVOICE_PROGRESS=1` forces them
on (a log collector that wants them); tqdm's own `TQDM_DISABLE=1` is honoured too. Results go to
stdout, so a bar never mixes with `aivoice detect` output or a pipe.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable

from tqdm import tqdm

PROGRESS_ENV = "AIVOICE_PROGRESS"
_OFF, _ON = {"0", "off", "false", "no"}, {"1", "on", "true", "yes"}


def enabled() -> bool:
    """Whether bars are drawn now: the environment's say, else whether stderr is a terminal."""
    setting = os.environ.get(PROGRESS_ENV, "").strip().lower()
    if setting in _OFF or os.environ.get("TQDM_DISABLE", "").strip().lower() in _ON:
        return False
    if setting in _ON:
        return True
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):   # replaced or closed stderr
        return False


def progress(iterable: Iterable | None = None, *, desc: str, unit: str = "it", total: float | None = None,
             leave: bool = False, when: bool = True, **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled (a pass-through, no output) unless `when` and `enabled()`."""
    return tqdm(iterable, desc=desc, unit=unit, total=total, leave=leave, file=sys.stderr,
                disable=not (when and enabled()), dynamic_ncols=True, **kwargs)

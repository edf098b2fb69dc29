"""One retrain at a time per store: a Prefect global concurrency limit named after the store's path.

The `retrain` deployment's `concurrency_limit=1` only serialises the runs of that one deployment: a
second deployment of the same checkout, a run started by hand, or `aivoice retrain` pointed at the same
server would still run DVC stages and a promotion on the same store at once (DVC's repository lock then
fails one stage half-way). So the flow holds a slot of the global concurrency limit
`aivoice-retrain-<sha256 of the store's absolute path, 16 hex>` (limit 1, created on first use) around
everything it does. A second run waits for the slot (up to `timeout_s`, then fails saying who it waited
for); a run whose process was killed keeps its slot only until its lease expires (LEASE_S after the
last renewal; the server's repossessor frees it), so a killed run never blocks the store for good.

Without a Prefect server ($PREFECT_API_URL unset: the flow runs on a temporary in-process backend that
no other process shares) there is nobody to share a limit with: the limit is skipped with a log line.
An operator can pause every retrain of a store with `prefect gcl update <name> --limit 0`.
"""
from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from prefect import get_run_logger
from prefect.exceptions import MissingContextError
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.logging import get_logger
from prefect.settings import PREFECT_API_URL

LEASE_S = 60.0        # a dead holder's slot is freed this long after its last renewal (renewed every ~45 s)
PREFIX = "aivoice-retrain-"


class StoreBusyError(RuntimeError):
    """Another retrain held the store's slot for longer than this run was willing to wait."""


def limit_name(store: Path) -> str:
    """The global concurrency limit of `store`: names may not contain '/', hence a hash of the path."""
    return PREFIX + hashlib.sha256(str(Path(store).resolve()).encode()).hexdigest()[:16]


def ensure_limit(name: str, slots: int = 1) -> bool:
    """Create global concurrency limit `name` with `slots` unless it exists; True when created.
    An existing limit is left as it is (an operator may have set it to 0 to pause retrains)."""
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
            return False
        except ObjectNotFound:
            pass
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))
            return True
        except ObjectAlreadyExists:   # another run created it between our read and our create
            return False


@contextmanager
def one_retrain_per_store(store: Path, timeout_s: float | None) -> Iterator[dict]:
    """Hold the store's slot for the block; yields {"limit", "acquired_at", "waited_s"} (limit None when
    skipped). Raises StoreBusyError when the slot is not free within `timeout_s` (None: wait for ever)."""
    try:
        logger = get_run_logger()
    except MissingContextError:   # called outside a flow run
        logger = get_logger(__name__)
    store = Path(store).resolve()
    if not PREFECT_API_URL.value():
        logger.info("no Prefect server (PREFECT_API_URL unset): store concurrency limit skipped for %s; "
                    "only runs that share a server can be kept apart", store)
        yield {"limit": None, "acquired_at": time.time(), "waited_s": 0.0}
        return
    name = limit_name(store)
    if ensure_limit(name):
        logger.info("created global concurrency limit %s (1 slot) for store %s", name, store)
    logger.info("taking global concurrency limit %s for store %s", name, store)
    started = time.time()
    with ExitStack() as stack:
        try:   # only the acquisition's timeout is turned into StoreBusyError, never one from the block
            stack.enter_context(concurrency(name, occupy=1, timeout_seconds=timeout_s, lease_duration=LEASE_S,
                                            strict=True))
        except TimeoutError as err:
            raise StoreBusyError(f"{store}: another retrain held global concurrency limit {name} for more than "
                                 f"{timeout_s:g} s; try again later or raise store_wait_s") from err
        acquired = time.time()
        logger.info("holding %s (waited %.1f s)", name, acquired - started)
        yield {"limit": name, "acquired_at": acquired, "waited_s": round(acquired - started, 3)}
    logger.info("released %s", name)

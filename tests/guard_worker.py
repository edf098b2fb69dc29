"""One process of the concurrent promote/rollback test: `python guard_worker.py SEED OPS OUT.json` promotes
and rolls back at random against $MLFLOW_TRACKING_URI, writing how each operation ended."""
from __future__ import annotations

import json
import random
import sys
import time

from pipeline.io import registry
from pipeline.io.registry import PromotionError, RegistryError


def main(seed: int, ops: int, out: str, candidates: list[int]) -> None:
    rng = random.Random(seed)
    results = []
    for i in range(ops):
        what = rng.choice(["promote", "rollback"])
        target = rng.choice(candidates)
        started = time.monotonic()
        try:
            if what == "promote":
                event = registry.promote(target, reason=f"worker {seed} op {i}", user=f"worker-{seed}")
            else:
                event = registry.rollback(reason=f"worker {seed} op {i}", user=f"worker-{seed}")
            outcome = {"result": "done", "version": event["version"], "previous": event["previous"]}
        except PromotionError as exc:   # refused: stale baseline, failed gates, already champion, champion moved
            outcome = {"result": "refused", "why": str(exc)}
        except RegistryError as exc:
            outcome = {"result": "error", "why": str(exc)}
        results.append({"op": what, "target": target, "s": round(time.monotonic() - started, 3)} | outcome)
        time.sleep(rng.uniform(0, 0.2))
    with open(out, "w") as f:
        json.dump(results, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], [int(v) for v in sys.argv[4].split(",")])

"""Per-request progress for `GET /v1/progress/{id}`, with bounded memory.

A request is `queued`, then `running` (step k of n, k = denoising steps done), then `done`, `failed`
or `cancelled` (client gone, timed out, or server shutting down). Live entries are bounded by the
queue and the running batch; finished entries are kept for `ttl_s` seconds and at most `keep` of them
(the oldest dropped first), then answer 404 like unknown ids.

All methods run on the event loop (the batcher delivers its events there), so no lock is needed.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

STATES = ("queued", "running", "done", "failed", "cancelled")


class ProgressBoard:
    """The state of live and recently finished requests, by request id."""

    def __init__(self, ttl_s: float = 600.0, keep: int = 1024, clock: Callable[[], float] = time.monotonic):
        self.ttl_s = float(ttl_s)
        self.keep = int(keep)
        self._clock = clock
        self._live: dict[str, dict] = {}
        self._done: OrderedDict[str, tuple[float, dict]] = OrderedDict()  # id -> (finished at, entry)

    def __contains__(self, request_id: str) -> bool:
        self._expire()
        return request_id in self._live or request_id in self._done

    def add(self, request_id: str, images: int, steps: int) -> None:
        """A request entered the queue."""
        self._live[request_id] = {"id": request_id, "status": "queued", "step": 0, "steps": int(steps),
                                  "images": int(images), "created": int(time.time())}
        self._expire()

    def update(self, request_id: str, event: dict) -> None:
        """A batcher event (`started`, `progress` with `step`) for a live request."""
        entry = self._live.get(request_id)
        if entry is None:
            return
        if event.get("event") == "started":
            entry["status"] = "running"
        elif event.get("event") == "progress":
            entry["status"] = "running"
            entry["step"] = int(event["step"])

    def finish(self, request_id: str, status: str, detail: str | None = None) -> None:
        """The request ended: `done`, `failed` or `cancelled`."""
        entry = self._live.pop(request_id, None)
        if entry is None:
            return
        entry["status"] = status
        if status == "done":
            entry["step"] = entry["steps"]
        if detail:
            entry["detail"] = detail
        self._done[request_id] = (self._clock(), entry)
        self._expire()

    def get(self, request_id: str) -> dict | None:
        """A copy of the request's entry, or None (unknown or expired)."""
        self._expire()
        entry = self._live.get(request_id)
        if entry is None and request_id in self._done:
            entry = self._done[request_id][1]
        return None if entry is None else dict(entry)

    def _expire(self) -> None:
        now = self._clock()
        while self._done and (len(self._done) > self.keep or now - next(iter(self._done.values()))[0] > self.ttl_s):
            self._done.popitem(last=False)

"""The scheduler: concurrent requests of one bucket and LoRA set become one sampler batch, run by one
worker thread.

- `Batcher.submit` (on the event loop) queues a `Ticket` (one request: its jobs, one per image) or
  raises `QueueFull` when `queue_size` tickets wait.
- The worker thread owns the pipeline. It takes the oldest ticket's key (shape bucket and LoRA set),
  waits until that key holds `max_batch` images or the oldest ticket has waited `max_wait_s`, takes the
  key's tickets in arrival order as long as their images fit in `max_batch`, and runs them as one batch
  (so requests with different LoRA sets never share a sampler batch). Each ticket
  gets its own images (its future) and per-step progress (its event queue); an exception fails that
  batch's tickets only. A cancelled ticket leaves the queue and, if already running, is dropped.
- Multi-host: `broadcast_runner` (host 0) sends each batch (its jobs, LoRA sets included) to the other
  hosts, where `follow` runs the same batch, so every host runs the same program on the same data.
  Every host must also reach the same outcome, or the next collective of one host would pair with a
  different one on another: a batch runs in two phases (`run_in_step`), each closed by one all-gather of
  every host's error line. The first phase is this host's own work that can fail on it alone (decoding
  the batch, reading its LoRA files); when it fails on any host, every host skips the computation.
  The second is the computation the hosts run together. Host 0 answers the requests with its own
  error, or with `HostFailed` naming the host and its error line, and the hosts go on in step. (A
  host that fails in the middle of the computation, between two of its collectives, cannot be
  brought back in step; that is a device or program failure, not a batch's.)
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from ...errors import LensError
from .. import jobs as jobs_lib

# runner(jobs, callback) -> float images [len(jobs), H, W, 3]; callback(step, timestep, latents)
Runner = Callable[[Sequence[jobs_lib.Job], Callable[[int, float, Any], None]], np.ndarray]


class QueueFull(LensError):
    """The queue holds `queue_size` requests; retry later (HTTP 429)."""


class Cancelled(LensError):
    """The request was cancelled (client gone, or timed out) before its images were made."""


class HostFailed(LensError):
    """Another host failed this batch; every host dropped it (they stay in step)."""


@dataclass(eq=False)
class Ticket:
    """One request waiting for its images."""

    jobs: list[jobs_lib.Job]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    enqueued: float = field(default_factory=time.monotonic)
    cancelled: threading.Event = field(default_factory=threading.Event)
    listener: Callable[[str, dict], None] | None = None  # also gets every event, on the loop

    @property
    def bucket(self) -> jobs_lib.Bucket:
        return self.jobs[0].bucket

    @property
    def key(self) -> tuple:
        """What must be equal to share a sampler batch: the shape bucket and the LoRA set."""
        return self.jobs[0].bucket, self.jobs[0].loras

    def post(self, event: dict) -> None:
        """Send a progress event from any thread."""
        self.loop.call_soon_threadsafe(self._deliver, event)

    def _deliver(self, event: dict) -> None:
        if self.listener is not None:
            self.listener(self.id, dict(event))
        self.events.put_nowait(event)

    def resolve(self, images=None, error: BaseException | None = None) -> None:
        """Answer from any thread (first answer wins)."""

        def settle():
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(images)

        self.loop.call_soon_threadsafe(settle)


@dataclass
class BatchStats:
    """What the batcher reports to its observer (metrics)."""

    bucket: jobs_lib.Bucket
    images: int
    requests: int
    seconds: float
    new_bucket: bool
    error: bool


class Batcher:
    """Collects tickets into batches and runs them one at a time on a worker thread."""

    def __init__(self, runner: Runner, max_batch: int, max_wait_s: float, queue_size: int,
                 on_batch: Callable[[BatchStats], None] | None = None,
                 on_queue: Callable[[int], None] | None = None,
                 on_event: Callable[[str, dict], None] | None = None):
        if max_batch < 1 or queue_size < 1 or max_wait_s < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_s >= 0.")
        self.runner = runner
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.queue_size = queue_size
        self._on_batch = on_batch or (lambda stats: None)
        self._on_queue = on_queue or (lambda n: None)
        self._on_event = on_event  # (ticket id, event) for every ticket's events, on its loop
        self._pending: list[Ticket] = []
        self._cond = threading.Condition()
        self._stop = False
        self._seen: set[jobs_lib.Bucket] = set()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ event-loop side

    def start(self) -> None:
        self._thread = threading.Thread(target=self._work, name="lens-batcher", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        with self._cond:
            self._stop = True
            for t in self._pending:
                t.resolve(error=Cancelled("the server is shutting down."))
            self._pending.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, jobs: Sequence[jobs_lib.Job], request_id: str | None = None) -> Ticket:
        """Queue one request's jobs (one bucket and LoRA set, at most max_batch); call from the event loop."""
        if not jobs or len(jobs) > self.max_batch or any(
                (j.bucket, j.loras) != (jobs[0].bucket, jobs[0].loras) for j in jobs):
            raise ValueError(f"a request needs 1..{self.max_batch} jobs of one bucket and LoRA set.")
        loop = asyncio.get_running_loop()
        ticket = Ticket(list(jobs), loop, loop.create_future(), asyncio.Queue(), listener=self._on_event)
        if request_id is not None:
            ticket.id = request_id
        with self._cond:
            if self._stop:
                raise Cancelled("the server is shutting down.")
            if len(self._pending) >= self.queue_size:
                raise QueueFull(f"the queue is full ({self.queue_size} requests); retry later.")
            self._pending.append(ticket)
            self._on_queue(len(self._pending))
            self._cond.notify_all()
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Drop a ticket: out of the queue if waiting, its result discarded if running."""
        ticket.cancelled.set()
        with self._cond:
            if ticket in self._pending:
                self._pending.remove(ticket)
                self._on_queue(len(self._pending))
        ticket.resolve(error=Cancelled("cancelled."))

    def queue_length(self) -> int:
        with self._cond:
            return len(self._pending)

    def ahead(self, request_id: str) -> int | None:
        """How many waiting requests are ahead of this one (None when it does not wait)."""
        with self._cond:
            return next((i for i, t in enumerate(self._pending) if t.id == request_id), None)

    # ------------------------------------------------------------------ worker side

    def _next_batch(self) -> list[Ticket] | None:
        with self._cond:
            while True:
                if self._stop:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                key = self._pending[0].key
                deadline = self._pending[0].enqueued + self.max_wait_s
                same = [t for t in self._pending if t.key == key]
                if sum(len(t.jobs) for t in same) >= self.max_batch or time.monotonic() >= deadline:
                    break
                self._cond.wait(max(0.0, deadline - time.monotonic()))
            batch, size = [], 0
            for t in same:
                if size + len(t.jobs) > self.max_batch:
                    break  # keep arrival order: a later, smaller request does not jump ahead
                batch.append(t)
                size += len(t.jobs)
            for t in batch:
                self._pending.remove(t)
            self._on_queue(len(self._pending))
            return batch

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            live = [t for t in batch if not t.cancelled.is_set()]
            if live:
                self._run(live)

    def _run(self, tickets: list[Ticket]) -> None:
        jobs = [j for t in tickets for j in t.jobs]
        bucket = jobs[0].bucket
        new = bucket not in self._seen
        for t in tickets:
            t.post({"event": "started", "batch_images": len(jobs)})

        def progress(step, timestep, latents):
            for t in tickets:
                if not t.cancelled.is_set():
                    t.post({"event": "progress", "step": int(step) + 1, "steps": bucket.steps})

        t0 = time.perf_counter()
        try:
            images = np.asarray(self.runner(jobs, progress))
        except Exception as e:  # one batch's failure fails its own requests only
            for t in tickets:
                t.resolve(error=e)
            self._on_batch(BatchStats(bucket, len(jobs), len(tickets), time.perf_counter() - t0, new, True))
            return
        self._seen.add(bucket)
        start = 0
        for t in tickets:
            t.resolve(images[start:start + len(t.jobs)])
            start += len(t.jobs)
        self._on_batch(BatchStats(bucket, len(jobs), len(tickets), time.perf_counter() - t0, new, False))


# ---------------------------------------------------------------------- runners


class PipelineRunner:
    """A `Runner` over a pipeline, in the two phases a multi-host batch needs (`run_in_step`).

    `prepare(jobs)` is this host's own work, which can fail on one host alone (reading its LoRA
    files); `execute(jobs, prepared, callback)` is the computation every host runs together.
    Called as a plain runner, it does both.
    """

    def __init__(self, pipe, batch_size: int, loras=None):
        self.pipe, self.batch_size, self.loras = pipe, batch_size, loras

    def _has_loras(self, jobs) -> bool:
        return self.loras is not None and bool(jobs[0].loras)

    def prepare(self, jobs: Sequence[jobs_lib.Job]) -> Any:
        return self.loras.adapters(self.pipe, jobs[0].loras) if self._has_loras(jobs) else None

    def execute(self, jobs: Sequence[jobs_lib.Job], prepared: Any, callback) -> np.ndarray:
        params = self.loras.params(self.pipe, jobs[0].loras, prepared) if self._has_loras(jobs) else None
        return jobs_lib.generate_batch(self.pipe, jobs, self.batch_size, callback, dit_params=params)

    def __call__(self, jobs: Sequence[jobs_lib.Job], callback) -> np.ndarray:
        return self.execute(jobs, self.prepare(jobs), callback)


def pipeline_runner(pipe, batch_size: int, loras=None) -> PipelineRunner:
    """Run jobs through `pipe`, always `batch_size` rows (so a batched answer equals a lone one).

    `loras` (a `serve.loras.LoraLibrary`) gives the DiT parameters of the jobs' LoRA set.
    """
    return PipelineRunner(pipe, batch_size, loras)


def _encode(jobs: Sequence[jobs_lib.Job] | None) -> bytes:
    return json.dumps(None if jobs is None else [j.settings() for j in jobs]).encode()


def _decode(payload: bytes) -> list[jobs_lib.Job] | None:
    rows = json.loads(payload.decode())
    return None if rows is None else [jobs_lib.Job(**r) for r in rows]


def _broadcast(payload: bytes | None) -> bytes:
    """Host 0's `payload` on every host (two collectives: its length, then its bytes).

    The payload is padded with spaces (JSON ignores them) to a power of two of at least 256 bytes,
    so the broadcast compiles once per size class, not once per message.
    """
    from jax.experimental import multihost_utils

    if payload is not None:
        payload = payload.ljust(max(256, 1 << (len(payload) - 1).bit_length()), b" ")
    n = multihost_utils.broadcast_one_to_all(np.int32(0 if payload is None else len(payload)))
    buf = np.zeros(int(n), np.uint8) if payload is None else np.frombuffer(payload, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes()


AGREE_BYTES = 256  # a flag and the start of one error line per host


def _error_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _agree(error: BaseException | None) -> dict[int, str]:
    """Every host's outcome of one phase, on every host: {process index: its error line} of the hosts that
    failed (empty: none). One all-gather of a fixed-size buffer per call when there are several hosts."""
    import jax

    if jax.process_count() == 1:
        return {} if error is None else {0: _error_line(error)}
    from jax.experimental import multihost_utils

    buf = np.zeros(AGREE_BYTES, np.uint8)
    if error is not None:
        line = _error_line(error).encode()[:AGREE_BYTES - 1]
        buf[0], buf[1:1 + len(line)] = 1, np.frombuffer(line, np.uint8)
    rows = np.asarray(multihost_utils.process_allgather(buf)).reshape(-1, AGREE_BYTES)
    return {p: bytes(row[1:]).rstrip(b"\0").decode(errors="replace") for p, row in enumerate(rows) if row[0]}


def _settle(failed: dict[int, str], error: BaseException | None, what: str) -> None:
    """Raise this host's own error, or `HostFailed` naming the others', when any host failed."""
    if error is not None:
        raise error
    if failed:
        hosts = "; ".join(f"host {p}: {line}" for p, line in sorted(failed.items()))
        raise HostFailed(f"this batch failed on another host ({hosts}); every host {what} it. Check that host's "
                         "log and files (e.g. its --lora-dir holds the same LoRAs as host 0's).")


def run_in_step(local: Runner, get_jobs: Callable[[], Sequence[jobs_lib.Job]], callback) -> np.ndarray:
    """Run one batch on this host so that every host reaches the same outcome (see the module docstring).

    `get_jobs()` (the batch, decoded on a follower) runs in the first phase with `local.prepare`
    (when `local` has one: a `PipelineRunner`); `local.execute` (or `local` itself) in the second.
    Each phase ends in `_agree`. Raises this host's own error, or `HostFailed` when only others failed.
    """
    error, jobs, prepared = None, None, None
    prepare = getattr(local, "prepare", None)
    try:
        jobs = get_jobs()
        prepared = None if prepare is None else prepare(jobs)
    except Exception as e:  # reported to every host, raised below
        error = e
    _settle(_agree(error), error, "skipped")
    images = None
    try:
        images = local(jobs, callback) if prepare is None else local.execute(jobs, prepared, callback)
    except Exception as e:  # reported to every host, raised below
        error = e
    _settle(_agree(error), error, "dropped")
    return images


class BroadcastRunner:
    """Host 0's runner on a multi-host mesh: broadcast each batch, then run it (with the other hosts).

    `stop()` (on shutdown) tells the followers to return. A lock keeps the stop message from
    interleaving its collectives with a batch still running on the worker thread (which would
    deadlock the hosts): `stop` waits for that batch, and batches after it are refused.
    """

    def __init__(self, local: Runner):
        self.local = local
        self._lock = threading.Lock()
        self._stopped = False

    def __call__(self, jobs, callback):
        with self._lock:
            if self._stopped:
                raise Cancelled("the server is shutting down.")
            _broadcast(_encode(jobs))
            return run_in_step(self.local, lambda: jobs, callback)

    def stop(self) -> None:
        """Send the followers the stop message, once, after the batch in flight (if any)."""
        with self._lock:
            if not self._stopped:
                self._stopped = True
                _broadcast(_encode(None))


def broadcast_runner(pipe, batch_size: int, loras=None) -> BroadcastRunner:
    """Host 0's runner on a multi-host mesh (`BroadcastRunner` over the pipeline runner)."""
    return BroadcastRunner(pipeline_runner(pipe, batch_size, loras))


def stop_followers() -> None:
    """Host 0, on shutdown: tell the other hosts' `follow` loops to return (prefer `BroadcastRunner.stop`,
    which waits for a batch still running)."""
    _broadcast(_encode(None))


def follow(pipe, batch_size: int, loras=None) -> None:
    """Hosts > 0: run every batch host 0 broadcasts, until it broadcasts the stop message.

    A no-op step callback keeps the same (host-driven) programs as host 0, which reports progress.
    `loras`: this host's `LoraLibrary` (the same --lora-dir contents as host 0's).
    """
    run = pipeline_runner(pipe, batch_size, loras)
    while (payload := _broadcast(None)).strip() != b"null":  # host 0's stop message
        try:
            run_in_step(run, lambda: _decode(payload), lambda *a: None)
        except Exception:  # every host knows the outcome; host 0 answers the requests
            continue

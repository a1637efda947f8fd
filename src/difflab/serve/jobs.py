"""One queue of model work, run by one worker thread off the request threads. A job's events (dicts)
are kept in order, so any number of listeners (two tabs, a reconnect) can read them from any point;
a job is cancelled by a flag its work checks at every network call. The queue is bounded: at most
:data:`MAX_WAITING` jobs wait or run in all, :data:`MAX_PER_CLIENT` of them for one client; a job
beyond that is refused (:class:`QueueFull`) instead of queued behind hours of work."""

from __future__ import annotations

import itertools
import queue
import sys
import threading
import time
import traceback
from collections import OrderedDict
from collections.abc import Callable

from difflab.errors import UsageError
from difflab.streaming import Cancelled

KEEP_FINISHED = 64  # finished jobs whose events stay readable
MAX_WAITING = 32  # jobs queued or running, in all
MAX_PER_CLIENT = 8  # ... for one client address


class QueueFull(UsageError):
    """Too many jobs waiting: answered with HTTP 429 and this line."""


class Job:
    """A unit of model work: ``work(job)`` calls ``job.emit(event)`` as results are ready."""

    def __init__(self, jid: str, kind: str, work: Callable[[Job], None], client: str = "") -> None:
        self.id, self.kind, self.work, self.client = jid, kind, work, client
        self.events: list[dict] = []
        self.state = "queued"  # queued, running, done, error, cancelled
        self.created = time.monotonic()
        self._cancel = threading.Event()
        self._changed = threading.Condition()

    def emit(self, event: dict) -> None:
        with self._changed:
            self.events.append(event)
            self._changed.notify_all()

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def finished(self) -> bool:
        return self.state in ("done", "error", "cancelled")

    @property
    def waiting(self) -> bool:
        """Queued or running and not cancelled: what counts against the queue's limits."""
        return not self.finished and not self.cancelled()

    def wait(self, after: int, timeout: float) -> list[dict]:
        """Events from index ``after`` on, waiting up to ``timeout`` s for one when there are none yet."""
        with self._changed:
            if len(self.events) <= after and not self.finished:
                self._changed.wait(timeout)
            return self.events[after:]

    def _finish(self, state: str, event: dict) -> None:
        with self._changed:
            self.state = state
            self.events.append(event)
            self._changed.notify_all()


class JobQueue:
    """Jobs run one at a time, in order, by one daemon thread."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._worker = threading.Thread(target=self._run, name="difflab-serve-worker", daemon=True)
        self._worker.start()

    def submit(self, kind: str, work: Callable[[Job], None], client: str = "") -> Job:
        """Queue ``work`` for ``client`` (its address); QueueFull when the queue is at a limit."""
        with self._lock:
            waiting = [j for j in self._jobs.values() if j.waiting]
            if len(waiting) >= MAX_WAITING:
                raise QueueFull(f"the explorer has {len(waiting)} jobs waiting or running (the limit is {MAX_WAITING}); "
                                "wait for one to finish or cancel one")
            mine = sum(j.client == client for j in waiting)
            if mine >= MAX_PER_CLIENT:
                raise QueueFull(f"you have {mine} jobs waiting or running (the limit is {MAX_PER_CLIENT} per client); "
                                "wait for one to finish or cancel one")
            job = Job(f"{next(self._ids)}", kind, work, client)
            self._jobs[job.id] = job
            self._prune()
            ahead = sum(1 for j in self._jobs.values() if not j.finished and j is not job)
        job.emit({"type": "queued", "ahead": ahead})
        self._queue.put(job)
        return job

    def get(self, jid: str) -> Job | None:
        with self._lock:
            return self._jobs.get(jid)

    def stop(self) -> None:
        for job in list(self._jobs.values()):
            job.cancel()
        self._queue.put(None)

    def _prune(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.finished]
        for k in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[k]

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled():
                job._finish("cancelled", {"type": "cancelled"})
                continue
            job.state = "running"
            job.emit({"type": "running"})
            t0 = time.perf_counter()
            try:
                job.work(job)
            except Cancelled:
                job._finish("cancelled", {"type": "cancelled", "seconds": time.perf_counter() - t0})
            except UsageError as e:  # bad settings found only while working: one line for the page
                job._finish("error", {"type": "error", "message": str(e)})
            except Exception as e:  # noqa: BLE001 - the page gets one line, the console the traceback
                traceback.print_exc(file=sys.stderr)
                job._finish("error", {"type": "error", "message": f"internal error ({type(e).__name__}); "
                                      "see the server's console"})
            else:
                job._finish("done", {"type": "done", "seconds": time.perf_counter() - t0})

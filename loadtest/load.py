"""Closed-loop load: N workers, each sending its next request when the last one returns,
bounded by a request count and a deadline. Latency is measured per request with perf_counter."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

# A worker factory returns the callable one worker uses (so each worker owns its client).
Call = Callable[[str], object]
WorkerFactory = Callable[[], Call]


@dataclass(frozen=True)
class LoadResult:
    system: str
    concurrency: int
    latencies_ms: np.ndarray
    errors: int
    seconds: float

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def throughput_rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.requests else float("nan")

    def summary(self) -> dict[str, float | int | str]:
        return {
            "system": self.system,
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "seconds": round(self.seconds, 3),
            "throughput_rps": round(self.throughput_rps, 2),
            "p50_ms": round(self.percentile_ms(50), 3),
            "p90_ms": round(self.percentile_ms(90), 3),
            "p99_ms": round(self.percentile_ms(99), 3),
            "mean_ms": round(float(self.latencies_ms.mean()), 3) if self.requests else None,
        }


def closed_loop(
    system: str,
    factory: WorkerFactory,
    queries: Sequence[str],
    concurrency: int,
    max_requests: int,
    max_seconds: float,
    warmup_requests: int = 5,
    in_order: bool = False,
) -> LoadResult:
    """Runs `concurrency` workers until `max_requests` completed or `max_seconds` passed.

    Each worker warms up (not timed), then all start together. Queries are drawn round-robin,
    each worker from its own offset, so concurrent requests carry different queries; with
    `in_order`, the workers share one position instead and the queries are sent once each, in
    the order given (a replayed stream, whose repeats are the point).
    """
    if concurrency < 1 or max_requests < 1:
        raise ValueError("concurrency and max_requests must be at least 1")
    calls = [factory() for _ in range(concurrency)]
    for call in calls:
        for n in range(warmup_requests):
            call(queries[n % len(queries)])
    budget = threading.Semaphore(max_requests)
    start_gate = threading.Barrier(concurrency + 1)
    latencies: list[list[float]] = [[] for _ in range(concurrency)]
    errors = [0] * concurrency
    deadline = [0.0]
    shared_position = itertools.count()  # next() on it is atomic under the GIL

    def worker(index: int) -> None:
        call, mine = calls[index], latencies[index]
        position = index * 7919  # a prime stride spreads workers over the query list
        start_gate.wait()
        while time.perf_counter() < deadline[0] and budget.acquire(blocking=False):
            if in_order:
                position = next(shared_position)
                if position >= len(queries):
                    break
            query = queries[position % len(queries)]
            position += 1
            began = time.perf_counter()
            try:
                call(query)
            except Exception:  # counted, not raised: a load test reports failures
                errors[index] += 1
                continue
            mine.append((time.perf_counter() - began) * 1000.0)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(concurrency)]
    for thread in threads:
        thread.start()
    began = time.perf_counter()
    deadline[0] = began + max_seconds
    start_gate.wait()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    return LoadResult(
        system,
        concurrency,
        np.array([ms for worker_ms in latencies for ms in worker_ms]),
        sum(errors),
        seconds,
    )

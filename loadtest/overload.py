"""Open-loop load: requests arrive at a fixed rate whether or not earlier ones were answered, as
shoppers do. Closed-loop tools (Locust's users, `bench`) slow down with the server and so cannot
show what overload does; this can.

`open_loop` sends at `rate_rps` for `duration_s`, each request with a client deadline, and
sorts every outcome: answered, shed by the server (UNAVAILABLE: a full queue or a queue timeout),
past the client's deadline, or another error. `recovery_s` then measures how long after the
load stopped the server answers a lone request at its normal latency again.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from ecomsearch import contract
from ecomsearch.client import protocol

OK = "ok"
SHED = "shed"  # UNAVAILABLE from the server: admission control at work
DEADLINE = "deadline"  # the client gave up waiting
ERROR = "error"  # anything else: should never happen
# Requests in flight beyond this are counted as not sent, so a dead server cannot make the
# generator itself run out of memory.
MAX_IN_FLIGHT = 20_000


@dataclass
class OpenLoopResult:
    rate_rps: float
    duration_s: float
    timeout_s: float
    outcomes: Counter = field(default_factory=Counter)
    accepted_latencies_ms: list[float] = field(default_factory=list)
    shed_latencies_ms: list[float] = field(default_factory=list)
    error_messages: Counter = field(default_factory=Counter)
    shed_messages: Counter = field(default_factory=Counter)
    # Per second of the run: (answered, shed, past deadline, other errors).
    timeline: list[list[int]] = field(default_factory=list)
    max_lateness_ms: float = 0.0  # how far behind schedule the generator fell
    sending_stopped_at: float = 0.0  # time.perf_counter() when the last request was due

    @property
    def offered(self) -> int:
        return sum(self.outcomes.values())

    def summary(self) -> dict:
        accepted = np.array(self.accepted_latencies_ms)
        shed = np.array(self.shed_latencies_ms)

        def pct(values: np.ndarray, q: float) -> float | None:
            return round(float(np.percentile(values, q)), 2) if len(values) else None

        return {
            "offered_rps": self.rate_rps,
            "duration_s": self.duration_s,
            "client_timeout_s": self.timeout_s,
            "offered": self.offered,
            "accepted": self.outcomes[OK],
            "shed": self.outcomes[SHED],
            "past_deadline": self.outcomes[DEADLINE],
            "errors": self.outcomes[ERROR],
            "accepted_rps": round(self.outcomes[OK] / self.duration_s, 1),
            "accepted_p50_ms": pct(accepted, 50),
            "accepted_p99_ms": pct(accepted, 99),
            "accepted_max_ms": pct(accepted, 100),
            "shed_p50_ms": pct(shed, 50),
            "shed_p99_ms": pct(shed, 99),
            "generator_max_lateness_ms": round(self.max_lateness_ms, 1),
            "error_messages": dict(self.error_messages.most_common(5)),
            "shed_messages": dict(self.shed_messages.most_common(3)),
        }


def _classify(error: Exception) -> str:
    status = str(getattr(error, "status", lambda: None)())
    if status == "StatusCode.UNAVAILABLE":
        return SHED
    if status == "StatusCode.DEADLINE_EXCEEDED":
        return DEADLINE
    return ERROR


async def _open_loop(
    url: str,
    queries: Sequence[str],
    rate_rps: float,
    duration_s: float,
    timeout_s: float,
    model: str,
    top_k: int,
) -> OpenLoopResult:
    import tritonclient.grpc as grpc_module
    import tritonclient.grpc.aio as aioclient

    result = OpenLoopResult(rate_rps, duration_s, timeout_s)
    seconds = int(np.ceil(duration_s))
    result.timeline = [[0, 0, 0, 0] for _ in range(seconds)]
    column = {OK: 0, SHED: 1, DEADLINE: 2, ERROR: 3}
    client = aioclient.InferenceServerClient(url)
    tasks: set[asyncio.Task] = set()
    start = time.perf_counter()

    async def one(query: str, second: int) -> None:
        sent = time.perf_counter()
        try:
            inputs = protocol.build_inputs(grpc_module, [query], top_k)
            await client.infer(model, inputs, client_timeout=timeout_s)
            outcome = OK
        except Exception as e:  # every failure is sorted and counted
            outcome = _classify(e)
            if outcome == ERROR:
                result.error_messages[str(e)[:160]] += 1
            elif outcome == SHED:
                result.shed_messages[str(e)[:160]] += 1
        latency_ms = (time.perf_counter() - sent) * 1000
        result.outcomes[outcome] += 1
        result.timeline[second][column[outcome]] += 1
        if outcome == OK:
            result.accepted_latencies_ms.append(latency_ms)
        elif outcome == SHED:
            result.shed_latencies_ms.append(latency_ms)

    try:
        total = int(rate_rps * duration_s)
        for n in range(total):
            due = start + n / rate_rps
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            else:
                result.max_lateness_ms = max(result.max_lateness_ms, (now - due) * 1000)
            if len(tasks) >= MAX_IN_FLIGHT:
                result.outcomes[ERROR] += 1
                result.error_messages["not sent: generator in-flight limit"] += 1
                continue
            task = asyncio.create_task(
                one(queries[n % len(queries)], min(int(n / rate_rps), seconds - 1))
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        result.sending_stopped_at = start + total / rate_rps
        if tasks:
            await asyncio.wait(tasks)
    finally:
        await client.close()
    return result


def open_loop(
    url: str,
    queries: Sequence[str],
    rate_rps: float,
    duration_s: float,
    timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S,
    model: str = contract.SEARCH_MODEL,
    top_k: int = contract.DEFAULT_TOP_K,
) -> OpenLoopResult:
    """Sends `rate_rps` requests a second for `duration_s`; waits for every answer."""
    return asyncio.run(_open_loop(url, queries, rate_rps, duration_s, timeout_s, model, top_k))


def lone_latencies_ms(url: str, queries: Sequence[str], count: int) -> list[float]:
    """`count` requests one after another (the unloaded latency, for a baseline)."""
    from ecomsearch.client import SearchClient

    latencies = []
    with SearchClient(url, timeout_s=10) as client:
        for n in range(count):
            sent = time.perf_counter()
            client.search(queries[n % len(queries)])
            latencies.append((time.perf_counter() - sent) * 1000)
    return latencies


def recovery_s(
    url: str,
    queries: Sequence[str],
    normal_ms: float,
    since: float,
    consecutive: int = 5,
    give_up_s: float = 60.0,
) -> float | None:
    """Seconds from `since` (a time.perf_counter() value: when the load stopped) until lone
    requests are answered within `normal_ms` `consecutive` times in a row; None if they never
    are within `give_up_s`."""
    from ecomsearch.client import SearchClient, SearchError

    streak_started = None
    streak = 0
    with SearchClient(url, timeout_s=10) as client:
        n = 0
        while time.perf_counter() - since < give_up_s:
            sent = time.perf_counter()
            try:
                client.search(queries[n % len(queries)])
                fast = (time.perf_counter() - sent) * 1000 <= normal_ms
            except SearchError:
                fast = False
            n += 1
            if fast:
                if streak == 0:
                    streak_started = sent
                streak += 1
                if streak >= consecutive:
                    return max(0.0, streak_started - since)
            else:
                streak = 0
    return None


@dataclass(frozen=True)
class OverloadSettings:
    multiple: float = 2.0  # of the measured saturation rate
    duration_s: float = 60.0
    client_timeout_s: float = contract.DEFAULT_CLIENT_TIMEOUT_S
    saturation_concurrency: int = 16
    saturation_seconds: float = 10.0
    saturation_rps: float | None = None  # measured when None


def measure_saturation_rps(url: str, queries: Sequence[str], concurrency: int, seconds: float):
    """Closed-loop throughput at `concurrency` (the bench's busy load): the LoadResult."""
    from ecomsearch.client import SearchClient
    from ecomsearch.loadtest.load import closed_loop

    clients = []

    def factory():
        client = SearchClient(url, timeout_s=10)
        clients.append(client)
        return lambda query: client.search(query)

    try:
        return closed_loop("triton", factory, queries, concurrency, 1_000_000, seconds)
    finally:
        for client in clients:
            client.close()


def run_overload(url: str, queries: Sequence[str], settings: OverloadSettings) -> dict:
    """Saturation, unloaded latency, then `multiple` x saturation open loop, then recovery."""
    busy = None
    saturation_rps = settings.saturation_rps
    if saturation_rps is None:
        busy = measure_saturation_rps(
            url, queries, settings.saturation_concurrency, settings.saturation_seconds
        )
        saturation_rps = busy.throughput_rps
    lone = np.array(lone_latencies_ms(url, queries, 100))
    # "Normal latency": what an unloaded server gives, with the machine's own jitter allowed.
    normal_ms = float(max(2 * np.percentile(lone, 50), np.percentile(lone, 99)))
    result = open_loop(
        url,
        queries,
        settings.multiple * saturation_rps,
        settings.duration_s,
        timeout_s=settings.client_timeout_s,
    )
    recovered_after_s = recovery_s(url, queries, normal_ms, since=result.sending_stopped_at)
    return {
        "saturation_rps": round(saturation_rps, 1),
        "busy_load": busy.summary() if busy is not None else None,
        "unloaded_p50_ms": round(float(np.percentile(lone, 50)), 2),
        "normal_latency_ms": round(normal_ms, 2),
        "overload": result.summary(),
        "recovery_s": None if recovered_after_s is None else round(recovered_after_s, 2),
        "timeline": result.timeline,
    }


def overload_markdown(report: dict) -> str:
    o = report["overload"]
    offered = max(o["offered"], 1)
    lines = [
        f"Open loop at {o['offered_rps']:.0f} req/s for {o['duration_s']:.0f} s "
        f"(saturation {report['saturation_rps']} req/s), client deadline "
        f"{o['client_timeout_s']} s.",
        "",
        "| offered | accepted | shed (UNAVAILABLE) | past deadline | other errors "
        "| accepted p50 / p99 | shed p50 / p99 | recovery |",
        "|---|---|---|---|---|---|---|---|",
        f"| {o['offered']} | {o['accepted']} ({o['accepted_rps']} req/s) "
        f"| {o['shed']} ({100 * o['shed'] / offered:.0f}%) | {o['past_deadline']} "
        f"| {o['errors']} | {o['accepted_p50_ms']} / {o['accepted_p99_ms']} ms "
        f"| {o['shed_p50_ms']} / {o['shed_p99_ms']} ms | {report['recovery_s']} s |",
    ]
    return "\n".join(lines) + "\n"

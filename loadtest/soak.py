"""A long open-loop run below saturation: zero errors expected, and the memory of tritonserver
and of every stub sampled, to catch leaks that a short test cannot."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from ecomsearch.loadtest.overload import measure_saturation_rps, open_loop
from ecomsearch.server.processes import StubInstance, group_members

MIB = 1 << 20


def rss_by_process_mib(group: int) -> dict[str, float]:
    """Resident memory of each process of the server's group, by name: `tritonserver`, or the
    model instance a stub serves (`retrieve_0_1`)."""
    import psutil

    memory = {}
    for process in group_members(group):
        if not process.alive:
            continue
        stub = StubInstance.from_process(process)
        name = stub.instance if stub else process.argv[0].rsplit("/", 1)[-1]
        try:
            memory[name] = psutil.Process(process.pid).memory_info().rss / MIB
        except psutil.Error:
            continue
    return memory


def run_soak(
    url: str,
    group: int,
    queries: Sequence[str],
    fraction: float,
    duration_s: float,
    sample_every_s: float = 30.0,
    warmup_s: float = 60.0,
    saturation_rps: float | None = None,
) -> dict:
    """Open loop at `fraction` of the saturation rate for `duration_s`. Memory growth is counted
    from the first sample after `warmup_s` (allocators and caches settle first) to the last."""
    if saturation_rps is None:
        saturation_rps = measure_saturation_rps(url, queries, 16, 10.0).throughput_rps
    samples: list[tuple[float, dict[str, float]]] = []
    done = threading.Event()
    started = time.monotonic()

    def sample() -> None:
        while True:
            samples.append((time.monotonic() - started, rss_by_process_mib(group)))
            if done.wait(sample_every_s):
                samples.append((time.monotonic() - started, rss_by_process_mib(group)))
                return

    sampler = threading.Thread(target=sample, name="memory-sampler", daemon=True)
    sampler.start()
    try:
        result = open_loop(url, queries, fraction * saturation_rps, duration_s)
    finally:
        done.set()
        sampler.join()
    settled = next((m for t, m in samples if t >= warmup_s), samples[0][1])
    final = samples[-1][1]
    growth = {
        name: round(final[name] - settled[name], 1) for name in sorted(final) if name in settled
    }
    return {
        "saturation_rps": round(saturation_rps, 1),
        "fraction": fraction,
        "load": result.summary(),
        "rss_settled_mib": {k: round(v, 1) for k, v in sorted(settled.items())},
        "rss_final_mib": {k: round(v, 1) for k, v in sorted(final.items())},
        "rss_growth_mib": growth,
        "rss_growth_total_mib": round(sum(growth.values()), 1),
        "samples": [(round(t, 1), round(sum(m.values()), 1)) for t, m in samples],
    }

"""Restarts the model instances whose Python-backend stub died.

tritonserver 2.51 does not notice a dead stub: the model stays READY, and every request routed to
that instance fails from then on. The watchdog compares the group's live stubs with the ones
it last saw healthy; when one is missing it reports the server degraded (the launcher's
readiness goes to 503), reloads that model through the model-repository API (Triton loads
fresh instances beside the old ones and then swaps them, so the healthy instances keep serving),
waits for the old instances to be gone, and reports healthy again. A model that fails to reload
`max_reload_attempts` times in a row marks the server as failed, and the launcher exits so that
whatever supervises it replaces it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ecomsearch.server.processes import StubInstance, group_members, stubs

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 0.5
MAX_RELOAD_ATTEMPTS = 3


class StubWatchdog(threading.Thread):
    def __init__(
        self,
        group: int,
        reload_model: Callable[[str], None],
        poll_interval_s: float = POLL_INTERVAL_S,
        max_reload_attempts: int = MAX_RELOAD_ATTEMPTS,
    ) -> None:
        super().__init__(name="stub-watchdog", daemon=True)
        self.group = group
        self.reload_model = reload_model
        self.poll_interval_s = poll_interval_s
        self.max_reload_attempts = max_reload_attempts
        self.degraded_since: float | None = None  # time.monotonic() of the first dead stub seen
        self.failed: str | None = None  # why the server cannot recover
        self.restarts: list[tuple[str, float]] = []  # (model, seconds degraded), for reports
        self._stopping = threading.Event()

    @property
    def healthy(self) -> bool:
        return self.degraded_since is None and self.failed is None

    def stop(self) -> None:
        self._stopping.set()

    def _live_stubs(self) -> list[StubInstance]:
        return [s for s in stubs(group_members(self.group)) if s.alive]

    def start(self) -> None:
        # The healthy set is read before start() returns, so a stub that dies right after the
        # server is ready is already one the watchdog expects.
        self._expected = {s.pid: s for s in self._live_stubs()}
        log.info("watchdog: %d Python-backend stub processes", len(self._expected))
        super().start()

    def run(self) -> None:
        expected = self._expected
        while not self._stopping.wait(self.poll_interval_s):
            live = {s.pid for s in self._live_stubs()}
            dead = [stub for pid, stub in expected.items() if pid not in live]
            if not dead:
                continue
            if self._stopping.is_set():  # the launcher is stopping the server: expected deaths
                return
            self.degraded_since = time.monotonic()
            models = sorted({stub.model for stub in dead})
            log.warning(
                "watchdog: stub process of %s died; reloading %s",
                ", ".join(f"{s.instance} (pid {s.pid})" for s in dead),
                ", ".join(models),
            )
            for model in models:
                if not self._reload(model):
                    return
            # The replaced instances' stubs (the dead one's healthy siblings) exit when
            # tritonserver finishes unloading the old instances, which can take a while; they are
            # not serving any more, so they are simply not expected from now on.
            replaced = {pid for pid, stub in expected.items() if stub.model in models}
            expected = {s.pid: s for s in self._live_stubs() if s.pid not in replaced}
            degraded_s = time.monotonic() - self.degraded_since
            self.restarts.extend((model, degraded_s) for model in models)
            self.degraded_since = None
            log.warning("watchdog: %s serving again after %.1f s", ", ".join(models), degraded_s)

    def _reload(self, model: str) -> bool:
        for attempt in range(1, self.max_reload_attempts + 1):
            if self._stopping.is_set():
                return False
            try:
                self.reload_model(model)
                return True
            except Exception as e:  # any failure to reload counts as an attempt
                log.error("watchdog: reloading %s failed (attempt %d): %s", model, attempt, e)
                self._stopping.wait(attempt)
        self.failed = f"model {model!r} could not be reloaded after its stub died"
        log.error("watchdog: %s", self.failed)
        return False

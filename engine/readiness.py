"""Readiness: the engine's start-up bookkeeping and what /readyz reports.

Start-up is the default model's load, then the QDS_PRELOAD variants' (at the same time, once
the default one is in). The engine is ready when none of them is still loading and the
default model loaded; a failed preload is a warning, a failed default model is the reason
/readyz gives until a request loads it. Alongside: the reason while not ready, the warnings,
and which denoiser serves the default model (eager, compiling, compiled: `engine.startup`).

`Readiness` only keeps that state. Each method changes it and returns what the engine loop
has to do (the `Status` event to send, the preloads to start); the loop (`engine.core`) sends
and watches loads itself, so this module imports nothing of it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine import messages as m

if TYPE_CHECKING:
    from engine.keys import ModelKey
    from engine.startup import Mode
    from engine.telemetry import MetricsRecorder
    from quantization.settings import QuantSettings

# The engine loop's logger: these lines were the loop's before they moved here, and log
# filters and dashboards keyed on it keep working.
log = logging.getLogger("qdserve.engine_core")


@dataclass
class AfterLoad:
    """What the engine loop does once a load succeeded: start `preloads` (the default model is
    in), then send `status` (None: nothing changed that /readyz shows)."""

    preloads: dict[ModelKey, QuantSettings] = field(default_factory=dict)
    status: m.Status | None = None


class Readiness:
    """The start-up loads, readiness, its reason, the warnings and the serving mode (module
    docstring). The load and compile threads call `is_starting`, `status`, `warn`,
    `warn_once` and `mode_changed` too (through `engine.preparing.Reports`), as they did on
    the loop: plain attribute updates, and the events they return go through the loop's
    locked outbox."""

    def __init__(
        self,
        default_key: ModelKey,
        preload: Mapping[ModelKey, QuantSettings],
        metrics: MetricsRecorder,
    ) -> None:
        self.default_key = default_key
        self.preload = preload
        self.metrics = metrics
        self.ready = False
        self.reason = "starting"
        self.warnings: list[str] = []
        # Which denoiser serves the default model: eager, compiling (eager while the graphs
        # build in the background), compiled (engine.startup).
        self.mode: Mode = "eager"
        # The start-up loads still under way; `_done` once none is (or the default failed).
        self._startup: set[ModelKey] = set()
        self._done = False
        self._stopping = False

    # -- start-up ----------------------------------------------------------------------------
    def begin(self) -> m.Status:
        """The engine starts loading the default model (the loop watches that load)."""
        status = self.status(f"loading {self.default_key.variant_id}")
        self._startup = {self.default_key}
        return status

    def is_starting(self, key: ModelKey) -> bool:
        """`key` is the default model and start-up is not over: its warm-up is /readyz's
        reason meanwhile (a reload later on is not)."""
        return key == self.default_key and not self._done

    def loaded(self, key: ModelKey) -> AfterLoad:
        """A load succeeded."""
        if key in self._startup:
            self._startup.discard(key)
            preloads: dict[ModelKey, QuantSettings] = {}
            if key == self.default_key:
                self._startup = set(self.preload)
                preloads = dict(self.preload)
            return AfterLoad(preloads, self._maybe_started())
        if key == self.default_key and self._done and not self.ready:
            # The default model failed at start-up and has now loaded on a request.
            return AfterLoad(status=self._set_ready())
        return AfterLoad()

    def load_failed(self, key: ModelKey, message: str, public: bool = False) -> m.Status | None:
        """A load failed with `message`; `public`: the text may be shown on /readyz."""
        if key not in self._startup:
            return None
        self._startup.discard(key)
        # /readyz is unauthenticated: the cause (paths, hub URLs) stays in the log, unless the
        # loop found it `public`: one of this package's own configuration refusals.
        cause = f": {message}" if public else " (the server log has the cause)"
        if key == self.default_key:
            log.error("default model failed to load: %s", message)
            self._startup = set()
            self._done = True
            return self.status(f"loading {key.variant_id} failed{cause}")
        log.warning("preloading %s failed: %s", key.variant_id, message)
        self.warnings.append(f"preloading {key.variant_id} failed{cause}")
        return self._maybe_started()

    def _maybe_started(self) -> m.Status | None:
        if not self._startup and not self._done:
            self._done = True
            return self._set_ready()
        return None

    def _set_ready(self) -> m.Status | None:
        if self._stopping:
            return None
        self.ready = True
        status = self.status("ready")
        log.info("ready: serving %s", self.default_key.variant_id)
        return status

    def stop(self) -> m.Status:
        """Shutting down: not ready, for good."""
        self._stopping = True
        self.ready = False
        return self.status("shutting down")

    # -- what /readyz shows ------------------------------------------------------------------
    def status(self, reason: str) -> m.Status:
        """A new reason (ready or not): the event that tells the HTTP process."""
        self.reason = reason
        if not self.ready:
            log.info("not ready: %s", reason)
        return self._event()

    def warn(self, text: str) -> None:
        """A warning, sent with the next status."""
        self.warnings.append(text)

    def warn_once(self, text: str) -> None:
        """A warning unless it is listed already."""
        if text not in self.warnings:
            self.warnings.append(text)

    def mode_changed(self, key: ModelKey, mode: Mode) -> m.Status | None:
        """A variant's serving mode changed: only the default model's shows (gauge and
        /readyz); None when nothing changed."""
        if key != self.default_key or mode == self.mode:
            return None
        self.mode = mode
        for name in ("eager", "compiling", "compiled"):
            self.metrics.serving_mode.labels(name).set(1 if name == mode else 0)
        return self._event()

    def _event(self) -> m.Status:
        return m.Status(self.ready, self.reason, tuple(self.warnings), self.mode)

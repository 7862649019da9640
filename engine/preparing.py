"""Preparing a variant for serving: the model cache's loader, and the compile policy it applies.

`Preparer.load` runs on the cache's load thread (`engine.cache`) for every load, start-up and
on demand alike, so there is one path from settings to a servable pipeline: load it
(`EngineHooks.load`), attach QDS_LORAS, note QDS_STEP_CACHE, then decide whether to compile
(`engine.compiling`: `compile_decision`, `compile_scope`) and how:

- in the background (QDS_COMPILE_BACKGROUND, `model` scope, the default compile hook): warm
  up eager and hand the graphs it met to a `engine.startup.BackgroundCompiler`; the variant
  serves at once, eager, until they are compiled;
- `auto`: compile and warm up in the foreground; a failure leaves the pipeline eager with a
  warning on /readyz, never the service down;
- forced (`true`): compile and warm up in the foreground; a failure fails the load.

Without a compile, the warm-up still runs when QDS_WARMUP_SIZES names sizes.

The engine loop (`engine.core`) decides and this module executes: it does not import the
loop. What a load has to tell the loop (a /readyz reason while the default model warms up, a
warning, a change of serving mode) goes through the callables of `Reports`, which the loop
wires to its readiness state (`engine.readiness`) and its outbox.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from engine.compiling import (
    compile_decision,
    compile_denoiser,
    compile_scope,
    uncompile,
    warmup_sizes,
)
from engine.keys import key_for
from engine.startup import BackgroundCompiler
from pipelines import lora, step_cache

if TYPE_CHECKING:
    from engine.keys import ModelKey
    from engine.startup import Mode
    from pipelines.loader import LoadedPipeline
    from quantization.settings import QuantSettings
    from service.settings import ServiceSettings

# The engine loop's logger: these lines were the loop's before they moved here, and log
# filters and dashboards keyed on it keep working.
log = logging.getLogger("qdserve.engine_core")


class Hooks(Protocol):
    """The replaceable steps a load runs (`engine.core.EngineHooks` provides them); read at
    each load, so a hook replaced before start-up is the one used."""

    load: Callable[[QuantSettings], LoadedPipeline]
    warmup: Callable[..., None]
    compile: Callable[[LoadedPipeline, str], None]


@dataclass(frozen=True)
class Reports:
    """How a load talks back to the engine loop without holding it. Called on the load thread
    (`mode_changed` and `warn_once` also on a background compile thread), so each must be
    safe to call from any thread."""

    # The default model's start-up load (readiness waits on it), not a later reload.
    is_starting: Callable[[ModelKey], bool]
    # A new not-ready reason for /readyz ("warming up ...").
    status: Callable[[str], None]
    # A warning for /readyz.
    warn: Callable[[str], None]
    # The same, unless that text is listed already (a background compile's error is seen
    # again at each later change of mode).
    warn_once: Callable[[str], None]
    # A variant's denoiser now serves eager, compiling or compiled.
    mode_changed: Callable[[ModelKey, Mode], None]


class Preparer:
    """The model cache's loader: settings in, a pipeline ready to serve out (module docstring)."""

    def __init__(
        self,
        settings: ServiceSettings,
        hooks: Hooks,
        *,
        default_key: ModelKey,
        lanes: int,
        reports: Reports,
    ) -> None:
        self.settings = settings
        self.hooks = hooks
        self.default_key = default_key
        # The warm-up runs on the engine's thread and, with lanes, on a lane's: dynamo keys
        # compiled graphs on the thread count.
        self.lanes = lanes
        self.reports = reports

    def load(self, settings: QuantSettings) -> LoadedPipeline:
        """The cache's loader (on its load thread): load, then compile and warm up."""
        loaded = self.hooks.load(settings)
        try:
            # QDS_LORAS: before compiling, so the hot-swap slot is part of the compiled graph.
            lora.attach(
                loaded,
                lora.parse_loras(self.settings.loras),
                required=key_for(settings) == self.default_key,
            )
            # QDS_STEP_CACHE: the warm-up also compiles the split forward it runs on.
            loaded.extra["step_cache"] = getattr(self.settings, "step_cache", "off")
            compiled, why = compile_decision(self.settings.compile, loaded)
            if compiled:
                why += f"; scope {compile_scope(self.settings.compile_scope, loaded)}"
            log.info("compile %s: %s", key_for(settings).variant_id, why)
            if compiled or self.settings.warmup_sizes:
                if self.reports.is_starting(key_for(settings)):
                    sizes = ", ".join(self.settings.warmup_sizes or ["the default size"])
                    self.reports.status(f"warming up {sizes}")
                if compiled and self._compiles_in_background(loaded):
                    self._compile_in_background(loaded, key_for(settings))
                elif compiled and self.settings.compile == "auto":
                    compiled = self._compile_or_eager(loaded)
                    self.reports.mode_changed(
                        key_for(settings), "compiled" if compiled else "eager"
                    )
                elif compiled:
                    self._compile_and_warm(loaded)
                    self.reports.mode_changed(key_for(settings), "compiled")
                if not compiled:
                    self.hooks.warmup(loaded, self._warmup_sizes(loaded))
        except BaseException:
            loaded.release()
            raise
        return loaded

    def _compiles_in_background(self, loaded: LoadedPipeline) -> bool:
        """QDS_COMPILE_BACKGROUND: the whole denoiser (`model` scope), with the default compile
        hook (tests and benchmarks that replace it keep the foreground path)."""
        return (
            bool(getattr(self.settings, "compile_background", True))
            and compile_scope(self.settings.compile_scope, loaded) == "model"
            and self.hooks.compile is compile_denoiser
        )

    def _compile_in_background(self, loaded: LoadedPipeline, key: ModelKey) -> None:
        """Ready at once, serving eager; the warm-up's forwards (eager, a fraction of a second)
        are what the compile thread compiles first (`engine.startup`)."""

        # With the step cache on, requests run the split forward's parts (head, tail,
        # output); the whole denoiser's graphs (more than half the compile time from an empty
        # cache: 81 of 140 s here) compile when a request first opts out of the cache.
        split = step_cache.parse(loaded.extra.get("step_cache")) is not None
        compiler = BackgroundCompiler(
            loaded,
            state=lambda: lora.slot_active(loaded),
            on_change=lambda c: self._compile_mode_changed(key, c),
            on_first_use=frozenset({"model"}) if split else frozenset(),
        )
        try:
            self.hooks.warmup(loaded, self._warmup_sizes(loaded), self.lanes)
        except BaseException:
            compiler.stop()
            raise
        compiler.start()

    def _compile_mode_changed(self, key: ModelKey, compiler: BackgroundCompiler) -> None:
        """On the compile thread: a variant's background compile changed mode."""
        if compiler.error is not None:
            self.reports.warn_once(compiler.error)
        # Called under the compiler's lock: read its fields, not its stats().
        done = compiler.compiled_at
        seconds = done - compiler.started_at if compiler.mode == "compiled" and done else None
        log.info(
            "serving mode of %s: %s%s",
            key.variant_id,
            compiler.mode,
            f" ({seconds:.1f}s of background compile; inductor cache: {compiler.cache_hits} "
            f"hit(s), {compiler.cache_misses} miss(es))"
            if seconds is not None
            else "",
        )
        self.reports.mode_changed(key, compiler.mode)

    def _compile_and_warm(self, loaded: LoadedPipeline) -> None:
        """Compile, then warm up every graph requests will use (`engine.compiling`)."""
        self.hooks.compile(loaded, self.settings.compile_scope)
        sizes = self._warmup_sizes(loaded)
        self.hooks.warmup(loaded, sizes, self.lanes)
        adapters = lora.adapters_of(loaded)
        if adapters is not None and adapters.adapters:
            # The slot enabled is a second graph of the compiled module: compile it now, not
            # on the first request that names an adapter.
            first = next(iter(adapters.adapters))
            self.hooks.warmup(loaded, sizes, self.lanes, ((first, 1.0),))

    def _compile_or_eager(self, loaded: LoadedPipeline) -> bool:
        """QDS_COMPILE=auto: a compile or warm-up that fails leaves the pipeline eager (with a
        warning on /readyz and in the log), never the service down."""
        try:
            self._compile_and_warm(loaded)
        except Exception as exc:
            uncompile(loaded)
            log.warning("QDS_COMPILE=auto: compiling failed, serving eager (%r)", exc)
            self.reports.warn(
                f"QDS_COMPILE=auto: compiling failed ({type(exc).__name__}), serving eager "
                "(the server log has the cause)"
            )
            return False
        return True

    def _warmup_sizes(self, loaded: LoadedPipeline) -> list[tuple[int, int]]:
        return warmup_sizes(self.settings.warmup_sizes, loaded)

"""Keep third-party start-up notices that need no action out of the default log.

Loading the first pipeline imports diffusers, transformers, torchao and bitsandbytes, and
each says something on the way (measured on a fresh `make serve`: nine lines before the model
is ready, none of them about the served model). Each notice below is matched where it is
made: a log record on the exact logger that emits it, or a warning of one category raised
from one library, and its message; anything else those libraries say still reaches the log.
A silenced notice is not lost: the first one writes one INFO line naming what is silenced,
and every one is logged in full at DEBUG (`QDS_LOG_LEVEL=DEBUG`).

`engine.logs.configure_logging` installs this in both processes (HTTP and engine: the
engine is a spawned process and configures its own logging before it loads a model).
"""

from __future__ import annotations

import logging
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, TextIO

log = logging.getLogger("qdserve.startup")


@dataclass(frozen=True)
class Notice:
    """One known notice: where it comes from and why no operator needs to see it."""

    name: str  # named in the INFO line
    message: str  # regex searched in the message text
    logger: str | None = None  # a log record created on exactly this logger, or
    category: type[Warning] | None = None  # a warning of this category ...
    path: str | None = None  # ... raised from a file whose path matches this regex


NOTICES: tuple[Notice, ...] = (
    # bitsandbytes registers its CPU ops at import and tries to fetch an optional AVX512-bf16
    # kernel from the hub (`kernels` package, not installed, hub unreachable). qdserve
    # refuses bitsandbytes on a CPU anyway (diffusers needs a GPU for it).
    Notice(
        "bitsandbytes optional CPU kernel",
        r"^Failed to load CPU gemm_4bit_forward from kernels-community",
        logger="bitsandbytes.backends.cpu.ops",
    ),
    # torchao tries to load every C++ extension in its wheel at import: `_C_mxfp8` is built
    # for CPython 3.10 and `_C_cutlass_90a` for Hopper GPUs. No quant type qdserve serves
    # needs either; a type that needs a missing kernel is refused at start-up with a reason.
    Notice(
        "torchao optional C++ kernels",
        r"^Failed to load .*Could not load this library",
        logger="torchao",
    ),
    # torchao 0.18 registers two Enums as pytree constants, which torch 2.13 deprecates (it
    # now treats Enums natively): a note between the two libraries, not about the model.
    Notice(
        "torch pytree Enum deprecation (torchao)",
        r"is an Enum subclass and is now natively supported by torch\.compile",
        logger="torch.utils._pytree",
    ),
    # diffusers 0.42 imports NF4Tensor / UintxTensor from torchao.dtypes to allow them in
    # torch.load; torchao 0.18 moved them. It only concerns pickled checkpoints holding those
    # tensor types, and no torchao type qdserve serves or saves uses them.
    Notice(
        "diffusers/torchao tensor-class import",
        r"^Unable to import `torchao` Tensor objects",
        logger="diffusers.quantizers.torchao.torchao_quantizer",
    ),
    # diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name works until
    # 1.0). qdserve's loader passes it; a rename in qdserve's code, nothing to configure.
    Notice(
        "diffusers torch_dtype rename (FutureWarning)",
        r"`torch_dtype` is deprecated",
        category=FutureWarning,
        path=r"[/\\]diffusers[/\\]",
    ),
    # transformers' image processors default to a torchvision backend; without torchvision
    # it falls back to the PIL one. diffusers' pipeline module touches CLIP's and SigLIP's
    # image processors; the served Flux pipelines use neither.
    Notice(
        "transformers torchvision fallback",
        r"requires torchvision \(not installed\); falling back to",
        logger="transformers.utils.import_utils",
    ),
    # With QDS_LORAS: diffusers' LoRA loader looks for text-encoder layers in each adapter
    # and says it found none. qdserve takes denoiser adapters only (it refuses a file with
    # text-encoder layers at start-up), so there are never any.
    Notice(
        "diffusers LoRA without text-encoder layers",
        r"^No LoRA keys associated to \w+ found with the prefix='text_encoder",
        logger="diffusers.loaders.lora_base",
    ),
)


class _Silencer(logging.Filter):
    """The filter on each notice's logger, and the warnings hook; counts what it silenced."""

    def __init__(self, notices: tuple[Notice, ...]) -> None:
        super().__init__()
        self.notices = notices
        self.counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._show_warning: Any = None  # the warnings.showwarning this one wraps

    def filter(self, record: logging.LogRecord) -> bool:
        for notice in self.notices:
            if notice.logger == record.name and re.search(notice.message, record.getMessage()):
                self.silence(notice, f"[{record.name}] {record.getMessage()}")
                return False
        return True

    def show_warning(
        self,
        message: Warning | str,
        category: type[Warning],
        filename: str,
        lineno: int,
        file: TextIO | None = None,
        line: str | None = None,
    ) -> None:
        for notice in self.notices:
            if (
                notice.category is not None
                and issubclass(category, notice.category)
                and re.search(notice.path or "", filename)
                and re.search(notice.message, str(message))
            ):
                text = f"{filename}:{lineno}: {category.__name__}: {message}"
                self.silence(notice, text)
                return
        self._show_warning(message, category, filename, lineno, file, line)

    def silence(self, notice: Notice, text: str) -> None:
        with self._lock:
            first = not self.counts
            self.counts[notice.name] += 1
        if first:
            names = "; ".join(n.name for n in self.notices)
            log.info(
                "third-party start-up notices that need no action here are kept out of this "
                "log (%s); QDS_LOG_LEVEL=DEBUG logs each in full",
                names,
            )
        log.debug("silenced third-party notice (%s): %s", notice.name, text)


_silencer: _Silencer | None = None


def silence_startup_noise() -> _Silencer:
    """Install the filters (once per process; again only to re-wrap warnings.showwarning
    after something replaced it). Returns the silencer, whose `counts` say what it caught."""
    global _silencer
    if _silencer is None:
        _silencer = _Silencer(NOTICES)
        # A filter on the logger that makes the record: it sees exactly that notice, before
        # any handler (the library's own or the last-resort one) would print it.
        for name in {n.logger for n in NOTICES if n.logger}:
            logging.getLogger(name).addFilter(_silencer)
    if warnings.showwarning != _silencer.show_warning:
        _silencer._show_warning = warnings.showwarning
        warnings.showwarning = _silencer.show_warning
    return _silencer

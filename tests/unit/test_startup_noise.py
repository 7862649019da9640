"""The start-up notice filter: each known notice is caught where it is made, anything else
passes; the first one caught says so once at INFO, each is logged in full at DEBUG.
(`tests/integration/test_startup_log.py` runs the real `qdserve serve`.)"""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest

from engine.startup_noise import NOTICES, _Silencer

# One real message per notice, as the library writes it (copied from a fresh `make serve`).
SAMPLES = {
    "bitsandbytes optional CPU kernel": "Failed to load CPU gemm_4bit_forward from "
    "kernels-community: No module named 'kernels'. Please make sure you already `pip install "
    "kernels` and the kernels >= 0.11.1",
    "torchao optional C++ kernels": "Failed to load /x/torchao/_C_mxfp8.so: Could not load this "
    "library: /x/torchao/_C_mxfp8.so",
    "torch pytree Enum deprecation (torchao)": "<enum 'KernelPreference'> is an Enum subclass "
    "and is now natively supported by torch.compile as an opaque value type.",
    "diffusers/torchao tensor-class import": "Unable to import `torchao` Tensor objects. This "
    "may affect loading checkpoints serialized with `torchao`",
    "diffusers torch_dtype rename (FutureWarning)": "`torch_dtype` is deprecated and will be "
    "removed in version 1.0.0. Please use `dtype` instead.",
    "transformers torchvision fallback": "`CLIPImageProcessor` requires torchvision (not "
    "installed); falling back to `CLIPImageProcessorPil` for backward compatibility.",
    "diffusers LoRA without text-encoder layers": "No LoRA keys associated to CLIPTextModel "
    "found with the prefix='text_encoder'. This is safe to ignore if ...",
}
DIFFUSERS_FILE = "/venv/lib/python3.11/site-packages/diffusers/utils/deprecation_utils.py"


@pytest.fixture
def silencer(caplog: pytest.LogCaptureFixture) -> Iterator[_Silencer]:
    """A fresh filter on the notices' loggers (the process-wide one is left alone)."""
    s = _Silencer(NOTICES)
    shown: list[tuple[object, ...]] = []
    s._show_warning = lambda *args: shown.append(args)
    s.shown = shown  # type: ignore[attr-defined]
    loggers = [logging.getLogger(n.logger) for n in NOTICES if n.logger]
    for logger in loggers:
        logger.addFilter(s)
    caplog.set_level(logging.DEBUG, logger="qdserve.startup")
    try:
        yield s
    finally:
        for logger in loggers:
            logger.removeFilter(s)


def test_every_notice_has_a_sample() -> None:
    assert set(SAMPLES) == {n.name for n in NOTICES}


def test_each_known_notice_is_caught_where_it_is_made(
    silencer: _Silencer, caplog: pytest.LogCaptureFixture
) -> None:
    for notice in NOTICES:
        if notice.logger:
            record = logging.LogRecord(notice.logger, logging.WARNING, "f.py", 1, "%s", None, None)
            record.args = (SAMPLES[notice.name],)
            assert silencer.filter(record) is False, notice.name
        else:
            assert notice.category is not None
            silencer.show_warning(
                notice.category(SAMPLES[notice.name]), notice.category, DIFFUSERS_FILE, 23
            )
    assert silencer.counts == {n.name: 1 for n in NOTICES}
    assert silencer.shown == []  # type: ignore[attr-defined]
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "QDS_LOG_LEVEL=DEBUG" in infos[0].getMessage()
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(debug) == len(NOTICES)
    for notice in NOTICES:
        assert any(SAMPLES[notice.name] in m for m in debug), notice.name
    # Where it came from is part of the full text.
    assert any("[bitsandbytes.backends.cpu.ops]" in m for m in debug)
    assert any(f"{DIFFUSERS_FILE}:23: FutureWarning" in m for m in debug)


def test_other_messages_pass(silencer: _Silencer) -> None:
    # The same logger with another message, another logger with a known message.
    ops = logging.LogRecord(
        "bitsandbytes.backends.cpu.ops", logging.WARNING, "f.py", 1, "out of memory", None, None
    )
    assert silencer.filter(ops) is True
    sample = SAMPLES["torchao optional C++ kernels"]
    elsewhere = logging.LogRecord(
        "torchao.quantization", logging.WARNING, "f.py", 1, sample, None, None
    )
    assert silencer.filter(elsewhere) is True
    # A FutureWarning from diffusers about something else, one from elsewhere, another category.
    silencer.show_warning(FutureWarning("quanto is deprecated"), FutureWarning, DIFFUSERS_FILE, 1)
    rename = SAMPLES["diffusers torch_dtype rename (FutureWarning)"]
    silencer.show_warning(FutureWarning(rename), FutureWarning, "/app/mine.py", 2)
    silencer.show_warning(UserWarning(rename), UserWarning, DIFFUSERS_FILE, 3)
    assert len(silencer.shown) == 3  # type: ignore[attr-defined]
    assert not silencer.counts


def test_the_installed_filter_is_on_the_notices_loggers() -> None:
    from engine.startup_noise import silence_startup_noise

    s = silence_startup_noise()
    assert silence_startup_noise() is s  # once per process
    for notice in NOTICES:
        if notice.logger:
            assert s in logging.getLogger(notice.logger).filters

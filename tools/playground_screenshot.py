"""Screenshot the playground mid-stream for the README: `python tools/playground_screenshot.py`.

Starts `qdserve serve` on the embedded model (with the demo LoRA declared, so the page lists
it), opens /playground in Debian's chromium (playwright), asks for three images with partial
images, and takes the picture once the first image's second partial is on screen and no final
image has arrived. The browser's download is throttled (chromium's network emulation) so the
stream, which the server finishes in well under a second, is caught half way. Writes
docs/playground.png (1000 px wide) unless another path is given.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
WIDTH = 1000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("qdserve serve exited during start-up")
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise SystemExit("qdserve serve was not ready in time")


def shoot(url: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        page = browser.new_page(viewport={"width": 1400, "height": 900}, device_scale_factor=1)
        page.goto(url + "/playground")
        page.wait_for_selector("#loras input[data-lora=orange]", state="attached")
        page.fill("#prompt", "a red circle on the left")
        for field, value in (("size", "32x32"), ("steps", "40"), ("seed", "42"), ("n", "3")):
            page.fill(f"#{field}", value)
        page.fill("#partials", "3")
        cdp = page.context.new_cdp_session(page)
        cdp.send("Network.enable")
        cdp.send(
            "Network.emulateNetworkConditions",
            {"offline": False, "latency": 0, "downloadThroughput": 3000, "uploadThroughput": -1},
        )
        page.click("#run")
        page.wait_for_function(
            "() => document.querySelectorAll('figure.result[data-index=\"0\"] .strip img')"
            ".length >= 2",
            timeout=120_000,
        )
        png = page.screenshot(full_page=False)
        finals = page.eval_on_selector_all("figure.result[data-state=final]", "els => els.length")
        browser.close()
    if finals:
        raise SystemExit("a final image had already arrived: run again")
    image = Image.open(io.BytesIO(png)).convert("RGB")
    image = image.resize((WIDTH, round(image.height * WIDTH / image.width)), Image.LANCZOS)
    image.save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "playground.png"
    port = _free_port()
    env = {
        **os.environ,
        "QDS_PORT": str(port),
        "QDS_LORAS": "orange",
        "QDS_COMPILE": "false",
        "QDS_TORCH_THREADS": "1",
    }
    qdserve = Path(sys.executable).parent / "qdserve"
    proc = subprocess.Popen([str(qdserve), "serve"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        _wait_ready(url, proc)
        shoot(url, out)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)


if __name__ == "__main__":
    main()

"""Copy what this machine's pip needs to reach the Python registry into the image build context.

    python3 deploy/image/pip_inputs.py OUT_DIR [--no-wheels]

Reads the machine's effective pip configuration (`pip config list`: PIP_* environment, then
the install and global sections of every config file, in pip's own precedence) and writes to
OUT_DIR, which the Dockerfile's builder stage copies to /tmp/pip-inputs/:

- `ca.crt`: the CA bundle pip trusts here (`cert`), so pip in the build trusts the same
  TLS interception or private CA;
- `wheels/`: the `*.whl` files of every local `find-links` folder (hard links where the file
  system allows), e.g. a CPU torch wheel that is on disk here;
- `pip.conf`: `cert`, `find-links`, `index-url`, `extra-index-url` and timeouts pointing at
  those copies, or passed through when they are http(s) URLs.

Left out, with a note: `file://` indexes (local mirrors, often many GB) and any URL carrying
credentials (the builder stage's layers stay in the local build cache, so no secret goes in).
`--no-wheels` leaves the wheel folder out: a GPU image must not find a local CPU torch wheel,
which pip would prefer to the registry's CUDA build (2.13.0+cpu sorts above 2.13.0).

Stdlib only: it runs with the machine's python3 before any virtual environment exists. Files
already identical in OUT_DIR are left alone, so Docker's build cache keeps hitting.
"""

from __future__ import annotations

import argparse
import ast
import filecmp
import os
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

IN_IMAGE = Path("/tmp/pip-inputs")  # where the Dockerfile copies OUT_DIR
KEYS = ("cert", "find-links", "index-url", "extra-index-url", "timeout", "default-timeout")


def pip_config(python: str) -> dict[str, str]:
    """Effective value of each key in KEYS: environment over install section over global."""
    try:
        out = subprocess.run(
            [python, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        print(f"pip-inputs: no pip configuration read ({exc}); pip uses its defaults")
        return {}
    found: dict[str, dict[str, str]] = {}
    for line in out.splitlines():
        name, sep, raw = line.partition("=")
        if not sep:
            continue
        section, _, key = name.rpartition(".")
        # pip prints repr() of each value.
        value = ast.literal_eval(raw) if raw[:1] in "'\"" else raw
        found.setdefault(key, {})[section] = value
    config = {}
    for key in KEYS:
        by_section = found.get(key, {})
        for section in (":env:", "install", "global"):
            if section in by_section:
                config[key] = by_section[section]
                break
    return config


def has_credentials(url: str) -> bool:
    parts = urlsplit(url)
    return bool(parts.username or parts.password)


def sync_file(src: Path, dst: Path, link: bool = False) -> None:
    """dst becomes a copy of src, untouched when already equal. link: a hard link where the
    file system allows (wheels are large and never edited; the CA bundle is copied, so an edit
    in the context cannot reach the machine's own file)."""
    if dst.exists() and filecmp.cmp(src, dst, shallow=False):
        return
    dst.unlink(missing_ok=True)
    if link:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--no-wheels", action="store_true", help="leave local wheels out")
    parser.add_argument("--python", default=sys.executable, help="python whose pip is read")
    args = parser.parse_args()

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    config = pip_config(args.python)
    lines = ["[global]"]
    keep = {".gitignore", "pip.conf"}

    cert = config.get("cert")
    if cert and Path(cert).is_file():
        sync_file(Path(cert).resolve(), out / "ca.crt")
        keep.add("ca.crt")
        lines.append(f"cert = {IN_IMAGE / 'ca.crt'}")
        print(f"pip-inputs: CA bundle {cert}")

    links: list[str] = []
    wheels: dict[str, Path] = {}
    for link in config.get("find-links", "").split():
        if link.startswith(("http://", "https://")) and not has_credentials(link):
            links.append(link)
        elif Path(link).is_dir():
            if args.no_wheels:
                print(f"pip-inputs: local wheel folder {link} left out (--no-wheels)")
                continue
            wheels.update((w.name, w) for w in sorted(Path(link).glob("*.whl")))
        else:
            print(f"pip-inputs: find-links {link!r} left out (not a folder or a plain URL)")
    if wheels:
        keep.add("wheels")
        (out / "wheels").mkdir(exist_ok=True)
        for stale in set(p.name for p in (out / "wheels").iterdir()) - set(wheels):
            (out / "wheels" / stale).unlink()
        for name, src in wheels.items():
            sync_file(src, out / "wheels" / name, link=True)
            print(f"pip-inputs: wheel {name}")
        links.insert(0, str(IN_IMAGE / "wheels"))
    if links:
        lines.append("find-links = " + " ".join(links))

    for key in ("index-url", "extra-index-url"):
        urls = []
        for url in config.get(key, "").split():
            if url.startswith(("http://", "https://")) and not has_credentials(url):
                urls.append(url)
            else:
                shown = url if not has_credentials(url) else urlsplit(url).hostname
                print(f"pip-inputs: {key} {shown} left out (local path or credentials)")
        if urls:
            lines.append(f"{key} = " + " ".join(urls))
    for key in ("timeout", "default-timeout"):
        if key in config:
            lines.append(f"{key} = {config[key]}")

    conf = "\n".join(lines) + "\n"
    if not (out / "pip.conf").is_file() or (out / "pip.conf").read_text() != conf:
        (out / "pip.conf").write_text(conf)
    for path in out.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())

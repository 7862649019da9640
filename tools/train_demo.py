#!/usr/bin/env python3
"""Train the demo model shipped as the embedded default (pipelines/demo_weights/).

Same as `qdserve train-demo` and `python -m examples.demo.train`; see docs/demo.md.
Run it with the project's venv: `.venv/bin/python tools/train_demo.py [--help]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Runnable from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from examples.demo.train import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

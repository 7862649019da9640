"""`python -m benchmarks ...` (what `qdserve bench` runs in a checkout)."""

import sys

from benchmarks import main

sys.exit(main(sys.argv[1:]))

"""``python -m benchmarks.gpu_suite``: exit status 1 when a section failed (its error is in the JSON)."""

import sys

from benchmarks.gpu_suite.runner import main

if __name__ == "__main__":
    sys.exit(1 if main()["failed"] else 0)

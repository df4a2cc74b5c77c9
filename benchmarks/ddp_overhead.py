"""distrain's ddp against a hand-written torch DDP loop (issue 3's benchmark): ``python benchmarks/ddp_overhead.py``.

The same as ``python -m benchmarks ddp_overhead`` (options: --rounds N, --smoke); see benchmarks/suites/ddp_overhead.py.
"""

import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, when run as a script
    from benchmarks.run import main

    sys.exit(main(["ddp_overhead", *sys.argv[1:]]))

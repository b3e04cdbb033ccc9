"""``python -m kvtide.cluster.bench ...``: the same as ``kvtide bench ...``."""

import sys

from kvtide.cluster.bench.cli import main

sys.exit(main())

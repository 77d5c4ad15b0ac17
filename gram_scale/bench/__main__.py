"""``python -m gram_scale.bench``: see ``gram_scale.bench.cli``."""

import sys

from gram_scale.bench.cli import main

sys.exit(main())

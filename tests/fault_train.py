"""``launch/train.py`` with the fault injection of ``GRAM_FAULT_KILL`` installed (see
``tests/faults.py``): what the resume and error tests launch."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faults import fault_callbacks  # noqa: E402

from gram_scale.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(callbacks=fault_callbacks()))

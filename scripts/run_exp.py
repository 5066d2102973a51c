#!/usr/bin/env python
"""Run one experiment with the reference's command line; see --help for the flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from lora_expressivity.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())

"""``python -m fastsam.demo``."""

import sys

from .cli import main

sys.exit(main())

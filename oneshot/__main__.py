"""``python -m oneshot``: the same command as ``oneshot``."""

import sys

from oneshot.cli import main

sys.exit(main())

"""``python3 -m labkit.lab.guest.pinprobe`` (the zipapp has its own __main__)."""

import sys

from .cli import main

sys.exit(main())

"""``python -m server.dashboard --db runs/fedlora.db`` (the same as ``fedlora dashboard``)."""

import sys

from server.dashboard.cli import main

sys.exit(main())

"""``python -m tools.train``: see :mod:`tools.train.cli`."""

from tools.train.cli import main

raise SystemExit(main())

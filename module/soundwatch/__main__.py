import sys

from soundwatch.cli import main

sys.exit(main())

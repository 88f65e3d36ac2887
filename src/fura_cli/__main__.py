"""``python -m fura_cli``: the ``fura`` command line."""

import sys

from fura_cli.commands import main

sys.exit(main())

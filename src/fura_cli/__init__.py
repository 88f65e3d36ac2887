"""The ``fura`` command line, on top of the library.

It lives beside the ``fura`` package rather than inside it so that ``fura --help`` and argument errors cost no
more than the interpreter: importing anything under ``fura`` imports PEFT (which registers FuRA), so the
library is imported only once a command runs.
"""

from fura_cli.commands import main

__all__ = ["main"]

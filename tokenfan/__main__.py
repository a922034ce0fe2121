"""``python -m tokenfan`` is the ``tokenfan`` command."""

from tokenfan.cli.main import main

main()

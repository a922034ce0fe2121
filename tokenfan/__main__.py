"""``python -m tokenfan`` is the ``tokenfan`` command."""

from tokenfan.cli import main

main()

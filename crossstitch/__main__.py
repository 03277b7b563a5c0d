"""``python -m crossstitch``: the same command line as ``crossstitch``."""

from crossstitch.cli.app import main

main()

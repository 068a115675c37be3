"""`python -m safemerge` runs the command line."""

from safemerge.cli import main

main()

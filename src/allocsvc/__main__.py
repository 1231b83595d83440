"""`python -m allocsvc` runs the CLI."""

from allocsvc.cli import main

main()

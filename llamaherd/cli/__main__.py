"""`python -m llamaherd.cli`: the `llamaherd` command."""

from llamaherd.cli import main

main()

"""`python -m cli` is the `meshd` command."""

from .main import main

main()

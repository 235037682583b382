"""`python -m meshd_cli` is the `meshd` command (named so in its help and completion)."""

from .main import main

main(prog_name="meshd")

"""`meshd completion bash|zsh|fish`: the shell completion script (click's) for `meshd`.

    eval "$(meshd completion bash)"                          # in ~/.bashrc
    eval "$(meshd completion zsh)"                           # in ~/.zshrc
    meshd completion fish > ~/.config/fish/completions/meshd.fish
"""

from __future__ import annotations

import click
from click.shell_completion import get_completion_class

SHELLS = ("bash", "zsh", "fish")


@click.command("completion")
@click.argument("shell", type=click.Choice(SHELLS))
def completion(shell: str) -> None:
    """Print the completion script for SHELL (bash, zsh or fish)."""
    root = click.get_current_context().find_root().command
    cls = get_completion_class(shell)
    assert cls is not None  # every choice is one of click's shells
    click.echo(cls(root, {}, "meshd", "_MESHD_COMPLETE").source())


COMMANDS: tuple[click.Command, ...] = (completion,)

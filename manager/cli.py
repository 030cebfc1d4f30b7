"""``streamboss``: the one command-line entry point."""

from __future__ import annotations

import click

from streamboss.agent.cli import agent_command, run_cli


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamboss")
def cli() -> None:
    """Run Unix programs between RabbitMQ streams."""


cli.add_command(agent_command)


def main() -> None:
    """Entry point of the ``streamboss`` console script."""
    run_cli(cli, "streamboss")

#!/usr/bin/env python3
"""The seed's `remove_operation.py NAME`.

A thin shim over `streamboss delete-operation`, with the seed's argument order.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["delete-operation"], "remove_operation.py")

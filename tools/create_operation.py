#!/usr/bin/env python3
"""The seed's `create_operation.py NAME DEFINITION INPUT OUTPUT`.

A thin shim over `streamboss create-operation`, with the seed's argument order.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["create-operation"], "create_operation.py")

#!/usr/bin/env python3
"""The seed's `create_stream.py STREAM`.

A thin shim over `streamboss create-stream`, with the seed's argument order.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["create-stream"], "create_stream.py")

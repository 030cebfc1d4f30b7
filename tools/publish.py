#!/usr/bin/env python3
"""The seed's `publish.py STREAM [MESSAGE...]`.

A thin shim over `streamboss publish`, with the seed's argument order.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["publish"], "publish.py")

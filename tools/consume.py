#!/usr/bin/env python3
"""The seed's `consume.py STREAM`.

A thin shim over `streamboss consume`, with the seed's argument order.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["consume"], "consume.py")

#!/usr/bin/env python3
"""The seed's `stream_archive.py STREAMNAME`: play a stream's archive back onto it.

A thin shim over `streamboss replay STREAM [--from T] [--until T] [--to STREAM]
[--rate N]`.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["replay"], "stream_archive.py")

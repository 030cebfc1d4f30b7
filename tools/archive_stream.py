#!/usr/bin/env python3
"""The seed's `archive_stream.py STREAMNAME`.

A thin shim over `streamboss archive-stream STREAM [--store URL]`: every message of
the stream goes into compressed segments in object storage.
"""

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

run_cli(cli.commands["archive-stream"], "archive_stream.py")

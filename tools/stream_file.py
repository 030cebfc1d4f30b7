#!/usr/bin/env python3
"""The seed's `stream_file.py STREAMNAME BUCKET FILENAME`.

A thin shim over `streamboss stream-file STREAM FILE --store s3://BUCKET`, with the
seed's argument order.
"""

import sys

from streamboss.agent.cli import run_cli
from streamboss.manager.cli import cli

args = sys.argv[1:]
if len(args) == 3 and not any(a.startswith("-") for a in args):
    stream, bucket, filename = args
    args = [stream, filename, "--store", f"s3://{bucket}"]
sys.argv = ["stream_file.py", *args]
run_cli(cli.commands["stream-file"], "stream_file.py")

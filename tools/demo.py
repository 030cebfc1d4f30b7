"""The embedded-default demo: two operations chained on the local RabbitMQ.

    demo-in --[waffle: python filter, service mode]--> demo-mid
            --[upper: tr a-z A-Z, per-message mode]--> demo-out

Publishes a few lines to demo-in, prints what arrives on demo-out with its
lineage headers, then stops both agents with SIGTERM (they drain and exit 0).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import pika

from streamboss.agent.config import BROKER_URL_ENV, DEFAULT_BROKER_URL, redact
from streamboss.agent.headers import output_properties
from streamboss.agent.naming import operation_queue, stream_exchange

STREAMS = ("demo-in", "demo-mid", "demo-out")
WAFFLE = ("python3 -c 'import sys\n"
          "for line in sys.stdin: sys.stdout.write(line.replace(\"pancake\", \"waffle\"))'")
LINES = [
    "i like pancake for breakfast",
    "pancake pancake pancake",
    "no breakfast today",
    "stream transforms are unix pipes on a broker",
]


def start_agent(operation: str, source: str, sink: str, *options: str) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "streamboss.agent", "--operation", operation,
            "--input", source, "--output", sink, "--log-level", "warning", *options]
    return subprocess.Popen(argv)


def main() -> int:
    url = os.environ.get(BROKER_URL_ENV, DEFAULT_BROKER_URL)
    try:
        connection = pika.BlockingConnection(pika.URLParameters(url))
    except pika.exceptions.AMQPConnectionError:
        print(f"demo: cannot reach RabbitMQ at {redact(url)}: start it with "
              "`rabbitmq-server -detached` or set STREAMBOSS_BROKER_URL", file=sys.stderr)
        return 1
    channel = connection.channel()
    for stream in STREAMS:
        channel.exchange_declare(stream_exchange(stream), "topic", durable=True)
    # The manager will own this: an operation's queue exists before its agents do,
    # so nothing published meanwhile is lost.
    for operation, source in (("demo-waffle", "demo-in"), ("demo-upper", "demo-mid")):
        channel.queue_declare(operation_queue(operation), durable=True)
        channel.queue_bind(operation_queue(operation), stream_exchange(source), "#")
    watch = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
    channel.queue_bind(watch, stream_exchange("demo-out"), "#")

    agents = [
        start_agent("demo-waffle", "demo-in", "demo-mid", "--mode", "service", "--exec", WAFFLE),
        start_agent("demo-upper", "demo-mid", "demo-out", "--exec", "tr a-z A-Z"),
    ]
    try:
        channel.confirm_delivery()
        run = uuid.uuid4().hex[:6]
        for number, line in enumerate(LINES):
            props = output_properties("demo-in", "/streamboss/demo", None)
            props.headers["sb-id"] = props.message_id = f"demo-{run}-{number}"
            channel.basic_publish(stream_exchange("demo-in"), "", line.encode(), props)
            print(f"published  {line!r}")
        received = 0
        deadline = time.monotonic() + 30
        for method, props, body in channel.consume(watch, inactivity_timeout=1):
            if method is not None:
                channel.basic_ack(method.delivery_tag)
                received += 1
                print(f"demo-out   {body.decode()!r}  (sb-parent {props.headers['sb-parent']})")
            if received == len(LINES) or time.monotonic() > deadline:
                break
        channel.cancel()
    finally:
        for agent in agents:
            agent.send_signal(signal.SIGTERM)
        codes = [agent.wait(timeout=60) for agent in agents]
    print(f"agents drained and exited with {codes}")
    for operation in ("demo-waffle", "demo-upper"):
        channel.queue_delete(operation_queue(operation))
    connection.close()
    return 0 if received == len(LINES) and codes == [0, 0] else 1


if __name__ == "__main__":
    sys.exit(main())

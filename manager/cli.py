"""``streamboss``: the one command-line entry point (verbs named after the seed's tools)."""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
import os
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pika

from streamboss.agent import headers as hdr
from streamboss.agent import objects
from streamboss.agent.cli import agent_command, run_cli
from streamboss.agent.config import (
    BROKER_URL_ENV,
    DEFAULT_BROKER_URL,
    OBJECT_ALLOW_ENV,
    OBJECT_STORE_ENV,
)
from streamboss.agent.log_format import escape_controls, setup_logging
from streamboss.agent.object_refs import ObjectStores, ReferenceRefused, parse_allow
from streamboss.agent.tls import BrokerTLSError, check_broker_tls

from .client import DEFAULT_HOST, DEFAULT_PORT, Client, ClientError
from .commands.common import OUTPUT
from .commands.common import call as _call
from .commands.common import emit as _emit
from .commands.common import fail as _fail
from .commands.common import table as _table
from .commands.dead_letters import dead
from .commands.pools import pool_lines
from .fetch import Fetcher, FetchError
from .model import ScalingPolicy
from .paths import objects_dir, state_dir
from .publisher import ConfirmedPublisher, PublishError
from .replay import ReplayError, parse_time, to_message
from .replay import check_window as check_replay_window
from .replay import select as select_records
from .streams_io import StreamError, check_stream, consume, publish


def _broker_url() -> str:
    """The broker URL, its TLS settings checked (a bad CA file is one line, exit 2)."""
    url = os.environ.get(BROKER_URL_ENV) or DEFAULT_BROKER_URL
    try:
        check_broker_tls(url)
    except BrokerTLSError as exc:
        _fail(exc)
    return url


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="streamboss")
def cli() -> None:
    """Run Unix programs between RabbitMQ streams.

    The CLI finds the manager through STREAMBOSS_URL (default http://127.0.0.1:8181)
    and the broker, for publish and consume, through STREAMBOSS_BROKER_URL.
    """


cli.add_command(agent_command)
cli.add_command(dead)

# -- running ------------------------------------------------------------------------


def _serve(state: str | None, host: str, port: int, dispatcher: str, banner: bool,
           stack: str | None = None, project_dir: Path | None = None,
           allowed_hosts: tuple[str, ...] = (), max_request_bytes: int | None = None,
           management_url: str | None = None, deploy: bool = True) -> None:
    # The server's web stack is imported only to serve: the data verbs stay light.
    from .server import ServerConfig, ServerError, serve

    setup_logging()
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # boto's own INFO lines (credentials found, ...) would drown the manager's.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    config = ServerConfig(state_dir(state), _broker_url(), host, port, dispatcher, stack,
                          project_dir, allowed_hosts, max_request_bytes, management_url,
                          BROKER_URL_ENV if os.environ.get(BROKER_URL_ENV) else "default",
                          deploy)
    try:
        serve(config, banner=banner)
    except ServerError as exc:
        _fail(exc)


# Not click's envvar: the manager reads the variable itself (manager/broker.py), and
# status names which of the two the URL came from.
MANAGEMENT_URL_OPTION = click.option(
    "--management-url", metavar="URL",
    help="RabbitMQ's management API, which shows who consumes a stream (demand); wins over "
         "env STREAMBOSS_MANAGEMENT_URL [beside the broker: http://HOST:15672, or "
         "https://HOST:15671 for amqps://]. Amazon MQ: https://HOST (443). Credentials: the "
         "broker URL's user, unless the URL carries its own.")


@cli.command()
@click.option("--state-dir", help="Where declarations live (env STREAMBOSS_STATE_DIR).")
@click.option("--host", default=DEFAULT_HOST, show_default=True,
              help="Address to bind. Beyond loopback STREAMBOSS_TOKEN is required; on "
                   "loopback without it the manager generates a token in its state directory, "
                   "where the CLI on this machine finds it.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A host name clients use in the manager's URL (repeatable; env "
                   "STREAMBOSS_ALLOWED_HOSTS, comma-separated). Loopback names, the bind "
                   "address and, bound to 0.0.0.0 or ::, any IP address are always "
                   "answered; a request naming another Host is refused (DNS rebinding).")
@click.option("--max-request-bytes", type=click.IntRange(min=1024), metavar="BYTES",
              help="Refuse request bodies over this size (env STREAMBOSS_MAX_REQUEST_BYTES) "
                   "[1048576].")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@click.option("--dispatcher", type=click.Choice(["local", "aws"]), default="local",
              show_default=True, envvar="STREAMBOSS_DISPATCHER",
              help="Where agents run: local processes, or the Pulumi stack's autoscaling groups "
                   "(env STREAMBOSS_DISPATCHER).")
@click.option("--stack", metavar="ORG/PROJECT/STACK", envvar="STREAMBOSS_STACK",
              help="The Pulumi stack the aws dispatcher updates (required with aws; env "
                   "STREAMBOSS_STACK).")
@click.option("--deploy/--no-deploy", default=True, envvar="STREAMBOSS_DEPLOY",
              help="aws: update the stack through the Automation API (needs the Pulumi CLI), "
                   "or leave its updates to `pulumi up` elsewhere and only publish the scaling "
                   "metrics and read the agent groups, as the manager node does (env "
                   "STREAMBOSS_DEPLOY=false) [deploy].")
@click.option("--project-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The directory holding Pulumi.yaml [the checkout's root].")
@MANAGEMENT_URL_OPTION
def manager(state_dir: str | None, host: str, allowed_hosts: tuple[str, ...],
            max_request_bytes: int | None, port: int, dispatcher: str, stack: str | None,
            project_dir: Path | None, management_url: str | None, deploy: bool) -> None:
    """Run the stream manager: HTTP API, reconciler and dispatcher.

    With --dispatcher aws, declaration changes update the Pulumi stack (preview,
    then up, through the Automation API; needs the Pulumi CLI) and the scaling
    metrics go to CloudWatch (credentials and region from the usual AWS chain).
    """
    if dispatcher == "aws" and not stack:
        raise click.UsageError("--dispatcher aws needs --stack ORG/PROJECT/STACK")
    if dispatcher != "aws" and (stack or project_dir or not deploy):
        raise click.UsageError("--stack, --project-dir and --no-deploy apply only to "
                               "--dispatcher aws")
    _serve(state_dir, host, port, dispatcher, banner=False, stack=stack,
           project_dir=project_dir, allowed_hosts=allowed_hosts,
           max_request_bytes=max_request_bytes, management_url=management_url,
           deploy=deploy)


@cli.command()
@click.option("--state-dir", help="Where declarations live (env STREAMBOSS_STATE_DIR).")
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=int)
@MANAGEMENT_URL_OPTION
def up(state_dir: str | None, port: int, management_url: str | None) -> None:
    """The embedded default: manager, local agents and a file:// object store, in the
    foreground. Ctrl-C stops everything it started."""
    _serve(state_dir, DEFAULT_HOST, port, "local", banner=True, management_url=management_url)


# -- declarations ---------------------------------------------------------------------


@cli.command("create-stream")
@click.argument("name")
@OUTPUT
def create_stream(name: str, fmt: str) -> None:
    """Create a stream (idempotent)."""
    result = _call("POST", "/v1/streams", json={"name": name})
    if fmt == "json":
        _emit(result, fmt)
    else:
        click.echo(f"stream {name} {'created' if result['created'] else 'already exists'}")


@cli.command("delete-stream")
@click.argument("name")
@click.option("--force", is_flag=True, help="Also delete the operations that use it.")
def delete_stream(name: str, force: bool) -> None:
    """Delete a stream."""
    result = _call("DELETE", f"/v1/streams/{name}", params={"force": force})
    extra = result["operations_deleted"]
    click.echo(f"stream {name} deleted" + (f" with operation(s) {', '.join(extra)}"
                                           if extra else ""))


@cli.command("define-process")
@click.argument("file", type=click.File("rb"))
@click.option("--name", help="Name the definition (else its 'name' field).")
@OUTPUT
def define_process(file: Any, name: str | None, fmt: str) -> None:
    """Register a process definition from FILE (JSON; - for stdin); prints its id."""
    try:
        data = json.loads(file.read())
    except (ValueError, UnicodeDecodeError) as exc:
        _fail(ValueError(f"{file.name} is not valid JSON: {exc}"))
    params = {"name": name} if name else {}
    result = _call("POST", "/v1/definitions", json=data, params=params)
    if fmt == "json":
        _emit(result, fmt)
    else:
        click.echo(result["id"])


@cli.command("delete-process")
@click.argument("definition")
@click.option("--force", is_flag=True, help="Also delete the operations that use it.")
def delete_process(definition: str, force: bool) -> None:
    """Delete a process definition (by id, or every version of a name)."""
    _call("DELETE", f"/v1/definitions/{definition}", params={"force": force})
    click.echo(f"process definition {definition} deleted")


def _policy_options(func: Any) -> Any:
    defaults = ScalingPolicy()
    for option in reversed([
        click.option("--min", "min_", type=int, help=f"Agents while wanted [{defaults.min}]."),
        click.option("--max", "max_", type=int, help=f"Agents at most [{defaults.max}]."),
        click.option("--target-backlog", type=int,
                     help=f"Waiting messages per agent [{defaults.target_backlog_per_agent}]."),
        click.option("--scale-out-cooldown", type=float,
                     help=f"Seconds between scale-outs [{defaults.scale_out_cooldown:g}]."),
        click.option("--scale-in-cooldown", type=float,
                     help=f"Seconds between scale-ins [{defaults.scale_in_cooldown:g}]."),
        click.option("--idle-seconds", type=float,
                     help=f"Unwanted this long, scale to zero [{defaults.idle_seconds:g}]."),
        click.option("--warm-pool", type=int,
                     help="AWS: stopped instances kept ready, to wake in seconds "
                          f"[{defaults.warm_pool}]."),
    ]):
        func = option(func)
    return func


@cli.command("create-operation")
@click.argument("name")
@click.argument("definition")
@click.argument("input_stream", metavar="INPUT")
@click.argument("output_stream", metavar="OUTPUT")
@_policy_options
@OUTPUT
def create_operation(name: str, definition: str, input_stream: str, output_stream: str,
                     min_: int | None, max_: int | None, target_backlog: int | None,
                     scale_out_cooldown: float | None, scale_in_cooldown: float | None,
                     idle_seconds: float | None, warm_pool: int | None, fmt: str) -> None:
    """Run DEFINITION (id or name) on every message of INPUT, publishing to OUTPUT."""
    policy = {"min": min_, "max": max_, "target_backlog_per_agent": target_backlog,
              "scale_out_cooldown": scale_out_cooldown, "scale_in_cooldown": scale_in_cooldown,
              "idle_seconds": idle_seconds, "warm_pool": warm_pool}
    result = _call("POST", "/v1/operations", json={
        "name": name, "definition": definition, "input": input_stream,
        "output": output_stream, "policy": {k: v for k, v in policy.items() if v is not None}})
    if fmt == "json":
        _emit(result, fmt)
    else:
        click.echo(f"operation {name}: {input_stream} -> {output_stream}")


@cli.command("delete-operation")
@click.argument("name")
def delete_operation(name: str) -> None:
    """Delete an operation; its agents drain and stop."""
    _call("DELETE", f"/v1/operations/{name}")
    click.echo(f"operation {name} deleted")


@cli.command("list")
@click.argument("what", required=False,
                type=click.Choice(["streams", "definitions", "operations", "archives"]))
@OUTPUT
def list_(what: str | None, fmt: str) -> None:
    """List streams, process definitions, operations and archives."""
    kinds = [what] if what else ["streams", "definitions", "operations", "archives"]
    data: dict[str, Any] = {}
    for kind in kinds:
        data[kind] = _call("GET", f"/v1/{kind}")
    if fmt == "json":
        _emit(data if what is None else data[what], fmt)
        return
    columns = {
        "streams": ["name", "created_at"],
        "definitions": ["id", "name", "version", "exec", "mode"],
        "operations": ["name", "definition_id", "input", "output", "min", "max"],
        "archives": ["stream", "state", "store", "running", "backlog"],
    }
    for kind in kinds:
        rows = data[kind]
        if kind == "definitions":
            rows = [{**r, "exec": r["definition"].get("exec"),
                     "mode": r["definition"].get("mode", "per-message")} for r in rows]
        if kind == "operations":
            rows = [{**r, "min": r["policy"]["min"], "max": r["policy"]["max"]} for r in rows]
        if kind == "archives":
            rows = [{**r, "state": "active" if r["active"] else f"stopped {r['stopped_at']}",
                     "backlog": "-" if r["backlog"] is None else r["backlog"]} for r in rows]
        if len(kinds) > 1:
            click.echo(f"{kind}:")
        _table(rows, columns[kind])
        if len(kinds) > 1:
            click.echo()


@cli.command()
@OUTPUT
def status(fmt: str) -> None:
    """Per operation: agents desired/running, backlog, dead-lettered count.

    First the broker, management API and archive store the manager uses (credentials
    redacted), where each came from, and whether each answers now."""
    result = _call("GET", "/v1/status")
    if fmt == "json":
        _emit(result, fmt)
        return
    if result.get("reconciler_error"):
        click.echo(f"reconciler: {result['reconciler_error']}", err=True)
    if not result.get("demand_observed"):
        click.echo("demand: management API unavailable; every operation counts as wanted",
                   err=True)
    if result.get("connections"):
        _connection_lines(result["connections"])
    if result.get("stack"):
        _stack_lines(result["stack"], result.get("cloud") or {})

    def rate(value: float | None) -> str:
        return "-" if value is None else f"{value:.1f}/s"

    rows = [{**r, "agents": f"{r['running']}/{r['desired']}", "in": rate(r["rate_in"]),
             "out": rate(r["rate_out"])} for r in result["operations"]]
    _table(rows, ["name", "input", "output", "wanted", "agents", "draining", "backlog",
                  "in", "out", "dead_lettered"])
    if result.get("archives"):
        click.echo()
        _table([{**a, "archiver": f"{a['running']}/{1 if a['active'] else 0}",
                 "state": "active" if a["active"] else "stopping" if a["backlog"] is not None
                 else "stopped", "backlog": "-" if a["backlog"] is None else a["backlog"]}
                for a in result["archives"]],
               ["stream", "state", "archiver", "backlog", "restarts", "store"])
    if result.get("cloud"):
        pool_lines(result["cloud"])


# The status block naming what the manager uses (manager/connections.py).
CONNECTION_LABELS = (("broker", "broker"), ("management", "management"),
                     ("archive_store", "archive store"))


def _connection_lines(connections: dict[str, Any]) -> None:
    """One line each: the URL the manager uses, where it came from, whether it answers."""
    for key, label in CONNECTION_LABELS:
        endpoint = connections.get(key)
        if not endpoint:
            continue
        line = f"{label + ':':<15}{endpoint['url']} (from {endpoint['source']}): " \
               f"{endpoint['state']}"
        click.echo(line)
    click.echo()


def _stack_lines(stack: dict[str, Any], cloud: dict[str, Any]) -> None:
    """The aws dispatcher's state in a line or two (errors on stderr)."""
    line = f"stack {stack['stack']}: {stack['state']}"
    if stack.get("next_attempt_in") is not None and stack["state"] in ("waiting", "failed"):
        line += f" (next attempt in {stack['next_attempt_in']:.0f}s)"
    last = stack.get("last_result")
    if last:
        changes = (last.get("summary") or {}).get("update", {}).get("changes") or {}
        counted = ", ".join(f"{n} {op}" for op, n in changes.items() if op != "same")
        line += (f"; last update {last['outcome']} at {last['finished_at']}"
                 + (f" ({counted})" if counted else ""))
    click.echo(line)
    if stack.get("last_error"):
        click.echo(f"stack: {stack['last_error']}", err=True)
    groups = cloud.get("agent_groups") or {}
    if groups.get("error"):
        click.echo(f"agent groups: {groups['error']} (agent counts unknown)", err=True)
    metrics = cloud.get("metrics") or {}
    if metrics.get("error"):
        click.echo(f"metrics: {metrics['error']}", err=True)


@cli.command("stack-config")
@OUTPUT
def stack_config_(fmt: str) -> None:
    """The declarations as the AWS stack's streamboss:operations value, for `pulumi up` run
    elsewhere than the manager (the manager node does not deploy):

      streamboss stack-config | pulumi config set streamboss:operations

    Env values stay masked; the names to set in the secret streamboss:operationsEnv go to
    stderr."""
    result = _call("GET", "/v1/stack-config")
    if fmt == "json":
        _emit(result, fmt)
        return
    click.echo(result["value"])
    for operation, names in sorted(result["env_names"].items()):
        click.echo(f"{operation}: env {', '.join(names)} go in the secret {result['env_key']}, "
                   f"e.g. pulumi config set --secret --path "
                   f"'{result['env_key']}[\"{operation}\"][\"{names[0]}\"]'", err=True)


@cli.command()
@click.option("--format", "fmt", type=click.Choice(["mermaid", "dot"]), default="mermaid",
              show_default=True)
def graph(fmt: str) -> None:
    """The stream/operation graph as Mermaid or DOT text."""
    click.echo(_call("GET", "/v1/graph", params={"format": fmt}), nl=False)


# -- data -----------------------------------------------------------------------------


def _stdin_lines() -> Iterator[bytes]:
    for line in sys.stdin.buffer:
        yield line.rstrip(b"\n")


@cli.command("publish")
@click.argument("stream")
@click.argument("messages", nargs=-1)
def publish_(stream: str, messages: tuple[str, ...]) -> None:
    """Publish MESSAGES (or stdin lines until EOF) to STREAM, with confirms."""
    source = (m.encode() for m in messages) if messages else _stdin_lines()
    try:
        count = publish(_broker_url(), stream, source)
    except StreamError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        return
    click.echo(f"published {count} message(s) to {stream}", err=True)


@cli.command("consume")
@click.argument("stream")
@click.option("--count", type=click.IntRange(min=1), help="Stop after this many messages.")
@click.option("--timeout", type=click.FloatRange(min=0),
              help="Stop after this many seconds without a message.")
@click.option("--raw", is_flag=True, help="Write bodies as raw bytes, nothing added.")
@click.option("-o", "--output", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Body text per line, or a JSON object per line.")
@click.option("--fetch", "fetch_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write referenced objects into this directory, under names made here, "
                   "and print their paths instead of the references. Objects are read only "
                   f"from the object store ({OBJECT_STORE_ENV}, default file://<state>/objects)"
                   f" and the prefixes of {OBJECT_ALLOW_ENV} (comma-separated), checked "
                   "against the reference's size and sha256 (without a sha256: its size, and "
                   "the sha256 computed is printed on stderr).")
@click.option("--dedup", type=click.IntRange(min=1), metavar="N",
              help="Drop a message whose id (sb-id, else its AMQP message-id) is among the "
                   "last N distinct ids shown: the duplicates at-least-once delivery makes. "
                   "Messages without an id are always shown; --count counts shown ones.")
def consume_(stream: str, count: int | None, timeout: float | None, raw: bool,
             fmt: str, fetch_dir: Path | None, dedup: int | None) -> None:
    """Print each message of STREAM as it arrives (Ctrl-C stops)."""
    out = sys.stdout.buffer
    fetcher: Fetcher | None = None
    if fetch_dir is not None:
        try:
            fetcher = Fetcher(fetch_dir, _user_object_stores())
        except FetchError as exc:
            _fail(exc)

    skipped = 0

    def show(body: bytes, props: pika.BasicProperties) -> None:
        nonlocal skipped
        claim = hdr.object_reference(props) if fetcher is not None else None
        if claim is not None and fetcher is not None:
            try:
                fetched = fetcher.fetch(claim)
            except (objects.ObjectStoreError, ReferenceRefused) as exc:
                # Whoever may publish may send a bad reference: it must not stop the
                # consumer for everyone else's messages.
                skipped += 1
                click.echo(escape_controls(f"consume: skipped message {hdr.message_id(props)}: "
                                           f"{exc}"), err=True)
                return
            if not fetched.by_digest:
                click.echo(f"{fetched.path}: the reference carries no sha256, so only its "
                           f"size was checked; sha256 {fetched.sha256}", err=True)
            out.write(str(fetched.path).encode() + b"\n")
        elif raw:
            out.write(body)
        elif fmt == "json":
            headers = {k: (v.decode(errors="replace") if isinstance(v, bytes) else v)
                       for k, v in (props.headers or {}).items()}
            try:
                payload: dict[str, Any] = {"body": body.decode()}
            except UnicodeDecodeError:
                payload = {"body_base64": base64.b64encode(body).decode()}
            out.write(json.dumps({**payload, "headers": headers}, default=str).encode() + b"\n")
        else:
            out.write(body.rstrip(b"\n") + b"\n")
        out.flush()

    try:
        consume(_broker_url(), stream, show, count=count, timeout=timeout, dedup=dedup or 0)
    except (StreamError, FetchError) as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass
    finally:
        if fetcher is not None:
            fetcher.close()
    if skipped:
        sys.exit(1)


def _user_object_stores() -> ObjectStores:
    """Where `consume --fetch` may read references: the user's object store (the one
    `stream-file` uses by default) and the prefixes of STREAMBOSS_OBJECT_ALLOW."""
    try:
        return ObjectStores.configured(_default_store(),
                                       parse_allow(os.environ.get(OBJECT_ALLOW_ENV)))
    except ValueError as exc:
        _fail(ValueError(f"{exc} (from {OBJECT_STORE_ENV} or {OBJECT_ALLOW_ENV})"))


def _default_store() -> str:
    return os.environ.get(OBJECT_STORE_ENV) or f"file://{objects_dir(state_dir())}"


@cli.command("stream-file")
@click.argument("stream")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--store", metavar="URL",
              help=f"Where the object goes: file:///DIR or s3://BUCKET[/PREFIX] (env "
                   f"{OBJECT_STORE_ENV}; default file://<state>/objects).")
def stream_file(stream: str, file: Path, store: str | None) -> None:
    """Upload FILE to object storage, then publish a reference to it on STREAM.

    Operations in per-message mode get the object's bytes on stdin, verified
    against its sha256, as if the file itself had been published.
    """
    try:
        source = file.open("rb")
    except OSError as exc:
        _fail(ValueError(f"cannot read {file}: {exc.strerror}"))
    broker = _broker_url()
    try:
        # The stream is checked first, so a bad name uploads nothing.
        check_stream(broker, stream)
        size = os.fstat(source.fileno()).st_size
        target = f"{(store or _default_store()).rstrip('/')}/{stream}/{uuid.uuid4().hex}/" \
                 f"{file.name}"
        content_type = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        # A missing bucket or unusable credentials are reported before the progress bar.
        objects.stat(target)
        with click.progressbar(length=size, label=f"uploading {file.name}", file=sys.stderr,
                               show_pos=True) as bar:
            lock = threading.Lock()

            def advance(count: int) -> None:
                with lock:  # S3 uploads report from several threads
                    bar.update(count)

            info = objects.put(target, source, content_type, progress=advance)
        publish(broker, stream, [info.url.encode()], headers={
            hdr.OBJECT_URL: info.url, hdr.OBJECT_SIZE: info.size,
            hdr.OBJECT_SHA256: info.sha256, hdr.OBJECT_CONTENT_TYPE: content_type})
    except (StreamError, objects.ObjectStoreError) as exc:
        _fail(exc)
    finally:
        source.close()
    click.echo(f"published a reference to {info.url} ({info.size} bytes, sha256 "
               f"{info.sha256}) on {stream}", err=True)


# -- archives -------------------------------------------------------------------------


@cli.command("archive-stream")
@click.argument("stream")
@click.option("--store", metavar="URL",
              help="Archive prefix: file:///DIR or s3://BUCKET[/PREFIX] (default: the "
                   "manager's, file://<state>/archive or STREAMBOSS_ARCHIVE_STORE). It must "
                   "lie under the manager's archive store or a prefix of its "
                   "STREAMBOSS_ARCHIVE_ALLOW (comma-separated).")
@click.option("--segment-mb", type=click.FloatRange(min=0.004),
              help="Roll a segment at this many MiB of messages [64].")
@click.option("--segment-seconds", type=click.FloatRange(min=0.001),
              help="Roll a segment this long after its first message [60].")
@OUTPUT
def archive_stream(stream: str, store: str | None, segment_mb: float | None,
                   segment_seconds: float | None, fmt: str) -> None:
    """Archive every message of STREAM into compressed segments in object storage.

    The archive is a durable subscription: messages published while its
    archiver is away wait for it. It also counts as a subscriber, so the
    operations that feed STREAM keep running.
    """
    body: dict[str, Any] = {"stream": stream, "store": store,
                            "segment_seconds": segment_seconds}
    if segment_mb is not None:
        body["segment_bytes"] = int(segment_mb * 1024 * 1024)
    result = _call("POST", "/v1/archives", json=body)
    if fmt == "json":
        _emit(result, fmt)
    else:
        click.echo(f"archiving {stream} into {result['store']}"
                   + ("" if result["started"] else " (already)"))


@cli.command("stop-archive")
@click.argument("stream")
def stop_archive(stream: str) -> None:
    """Stop archiving STREAM; what its subscription holds is still stored, and the
    archive stays replayable."""
    result = _call("DELETE", f"/v1/archives/{stream}")
    click.echo(f"stopped archiving {stream}; its archive stays in {result['store']}")


@cli.command("replay")
@click.argument("stream")
@click.option("--from", "from_", metavar="TIME", help="First time to replay (RFC 3339).")
@click.option("--until", metavar="TIME", help="Replay records before this time (RFC 3339).")
@click.option("--to", "target", metavar="STREAM", help="Publish onto this stream instead.")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True),
              help="Messages per second at most [as fast as the broker confirms].")
@click.option("--store", metavar="URL",
              help="Where the archive lives [the store the manager archived it to].")
def replay(stream: str, from_: str | None, until: str | None, target: str | None,
           rate: float | None, store: str | None) -> None:
    """Publish STREAM's archived messages, in their original order and with their
    original ids, back onto STREAM (or --to another stream)."""
    try:
        from_ts = parse_time(from_, "--from") if from_ else None
        until_ts = parse_time(until, "--until") if until else None
        check_replay_window(from_ts, until_ts)
    except ReplayError as exc:
        _fail(exc)
    if store is None:
        try:
            store = Client().request("GET", f"/v1/archives/{stream}")["store"]
        except ClientError as exc:
            _fail(ClientError(f"{exc} (or pass --store URL)"))
    assert store is not None
    destination = target or stream
    try:
        selection = select_records(store, stream, from_ts, until_ts)
        check_stream(_broker_url(), destination)
        with click.progressbar(length=selection.estimate, label=f"replaying {stream}",
                               file=sys.stderr, show_pos=True) as bar:
            publisher = ConfirmedPublisher(_broker_url(), destination, rate=rate,
                                           on_progress=bar.update)
            count = publisher.run(to_message(r, stream) for r in selection.records)
    except (ReplayError, StreamError) as exc:
        _fail(exc)
    except PublishError as exc:
        _fail(PublishError(f"{exc} ({publisher.confirmed} message(s) were replayed before)"))
    click.echo(f"replayed {count} message(s) from the archive of {stream} onto "
               f"{destination}", err=True)


def main() -> None:
    """Entry point of the ``streamboss`` console script."""
    run_cli(cli, "streamboss")


if __name__ == "__main__":
    main()

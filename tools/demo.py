"""The embedded default, end to end: `streamboss up`, then the seed's quickstart.

Starts the manager with the local dispatcher, then runs the seed's steps
through the `tools/` shims: create a stream, register `tr [a-z] [A-Z]`,
create an operation, archive the input stream, consume the output, publish;
then replay the archived input onto another stream. Prints what the consumers
receive and stops everything. `--stay` keeps the manager running afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from streamboss.manager.api_token import token_file
from streamboss.manager.client import token_for
from streamboss.manager.paths import CHECKOUT_STATE, STATE_DIR_ENV

TOOLS = Path(__file__).resolve().parent
ROOT = TOOLS.parent
URL = os.environ.get("STREAMBOSS_URL", "http://127.0.0.1:8181")
LINES = ["hello world", "i like pancakes", "streams are unix pipes on a broker"]


def shim(name: str, *args: str, check: bool = True) -> str:
    """Run one of the seed's scripts and return what it printed."""
    argv = [sys.executable, str(TOOLS / name), *args]
    print("$ " + shlex.join([f"./{name}", *args]), flush=True)
    result = subprocess.run(argv, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if output:
        print("  " + output.replace("\n", "\n  "), flush=True)
    if check and result.returncode != 0:
        raise SystemExit(f"demo: {name} failed")
    return result.stdout


def wait_for_manager(manager: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if manager.poll() is not None:
            raise SystemExit("demo: `streamboss up` exited; see its message above")
        try:
            if httpx.get(f"{URL}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.2)
    raise SystemExit(f"demo: the manager did not answer at {URL}")


def consumer_of(stream: str) -> subprocess.Popen[str]:
    print(f"$ ./consume.py {stream} &", flush=True)
    process = subprocess.Popen(
        [sys.executable, str(TOOLS / "consume.py"), stream, "--count", str(len(LINES)),
         "--timeout", "30"], stdout=subprocess.PIPE, text=True)
    time.sleep(1.0)
    return process


def replay_archive(since: str) -> bool:
    """Replay what this run published to mystream, from its archive, onto another stream."""
    time.sleep(2.5)  # the archiver stores a segment a second after its first message
    shim("create_stream.py", "replayed")
    consumer = consumer_of("replayed")
    shim("stream_archive.py", "mystream", "--from", since, "--to", "replayed")
    out, _ = consumer.communicate(timeout=60)
    print("  " + out.strip().replace("\n", "\n  "))
    ok = out.strip().splitlines() == LINES
    print("demo: the archive replayed what was published" if ok
          else "demo: the replay did not match")
    return ok


def clean_up(definition: int | None) -> None:
    """Remove what the demo declared, so the hand-run quickstart after it starts afresh."""
    steps = [["stop-archive", "mystream"], ["delete-operation", "my-operation"],
             *(["delete-stream", name, "--force"]
               for name in ("mystream", "outputstream", "replayed")),
             *([["delete-process", str(definition), "--force"]] if definition else [])]
    for step in steps:
        subprocess.run([sys.executable, "-m", "streamboss.manager", *step], cwd=ROOT,
                       capture_output=True, timeout=60)
    print("demo: removed its streams, operation, archive and definition "
          "(--stay keeps them)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stay", action="store_true", help="keep the manager running")
    args = parser.parse_args()
    port = URL.rsplit(":", 1)[-1].strip("/")
    manager = subprocess.Popen([sys.executable, "-m", "streamboss.manager", "up",
                                "--port", port], cwd=ROOT)
    definition: int | None = None
    try:
        wait_for_manager(manager)
        shim("create_stream.py", "mystream")
        # The seed registered its definition with a plain HTTP call; that still works,
        # with the token the manager generated (the shims find it by themselves).
        seed = {"definition": {"exec": "tr [a-z] [A-Z]", "application": "demo",
                               "name": "upper"}}
        token = token_for(URL)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        registered = httpx.post(f"{URL}/api/process_definition/", json=seed, headers=headers,
                                timeout=10).json()
        definition = registered.get("id")
        state = Path(os.environ.get(STATE_DIR_ENV) or ROOT / CHECKOUT_STATE)
        shown = "$STREAMBOSS_TOKEN" if os.environ.get("STREAMBOSS_TOKEN") else \
            f"$(cat {token_file(state)})"
        print(f"$ curl -X POST {URL}/api/process_definition/ -H \"Authorization: Bearer "
              f"{shown}\" -d '{json.dumps(seed)}'\n"
              f"  {json.dumps(registered)}")
        declared = httpx.get(f"{URL}/v1/operations", headers=headers, timeout=10).json()
        if any(op["name"] == "my-operation" for op in declared):  # left by an earlier run
            shim("remove_operation.py", "my-operation")
        shim("create_operation.py", "my-operation", str(registered["id"]), "mystream",
             "outputstream")
        # Archive the input (1 s segments, so the demo need not wait a minute).
        shim("archive_stream.py", "mystream", "--segment-seconds", "1")
        started = datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")
        consumer = consumer_of("outputstream")
        shim("publish.py", "mystream", *LINES)
        out, _ = consumer.communicate(timeout=60)
        print("  " + out.strip().replace("\n", "\n  "))
        received = out.strip().splitlines()
        # Per-message children run concurrently, so outputs may come in any order.
        ok = sorted(received) == sorted(line.upper() for line in LINES)
        print("demo: the transformed text arrived" if ok else "demo: output did not match")
        ok = replay_archive(started) and ok
        if args.stay:
            print(f"The manager stays up at {URL}; Ctrl-C stops it.", flush=True)
            manager.wait()
        return 0 if ok else 1
    except KeyboardInterrupt:
        return 130
    finally:
        if manager.poll() is None:
            if not args.stay:
                clean_up(definition)
            manager.send_signal(signal.SIGINT)
            manager.wait(timeout=60)


if __name__ == "__main__":
    sys.exit(main())

"""Helpers shared by the RocketMQ 5 Python SDK tests: the raftmq CLI, bounded waits, names.

Nothing here talks to the gateway: the tests reach it only through the SDK's public API
(`from rocketmq import ...`). The raftmq CLI (`<bin> admin ...`, raftmq's own protocol via the
NameServer) creates topics and groups up front and inspects dead letters and the cluster.
"""

import os
import random
import re
import subprocess
import sys
import threading
import time


class Fail(Exception):
    """A check did not hold; the message says what was expected and what was seen."""


def expect(cond, what):
    if not cond:
        raise Fail(what)


def bounded(seconds, what, fn, *args, **kwargs):
    """Runs fn(*args) on a daemon thread and waits at most `seconds` for it.

    The SDK's blocking calls have gRPC deadlines of their own, but several wait on futures
    without a timeout: a call still running after `seconds` is reported as a hang instead
    of hanging the test (the daemon thread is abandoned).
    """
    box = {}

    def run():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as e:  # noqa: B902 - handed to the caller
            box["error"] = e

    t = threading.Thread(target=run, name=f"bounded:{what}", daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        raise Fail(f"{what} to return or raise within {seconds:.0f} s, it hung")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def run_id():
    """Unique per run, and legal in RocketMQ names ([%a-zA-Z0-9_-])."""
    return f"{int(time.time()) % 1000000}-{os.getpid()}-{random.randrange(16 ** 4):04x}"


class Cli:
    """The raftmq binary's admin commands, each bounded, failing with its output."""

    def __init__(self, binary, namesrv):
        self.binary = binary
        self.namesrv = namesrv

    def admin(self, *args, timeout=30, check=True):
        cmd = [self.binary, "admin", *args, "--namesrv", self.namesrv]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise Fail(f"`{' '.join(cmd)}` to finish within {timeout} s, it did not")
        if check and p.returncode != 0:
            raise Fail(
                f"`{' '.join(cmd)}` to succeed, it exited {p.returncode}: {(p.stderr or p.stdout).strip()[-800:]}"
            )
        return p

    def create_topic(self, topic, message_type, queues=4, within=15):
        """`admin topic create --message-type T`, then waits until `admin topic list` shows it
        with that type (the gateway's routes are only as fresh as the brokers' state)."""
        self.admin("topic", "create", "--topic", topic, "--queues", str(queues),
                   "--message-type", message_type)
        deadline = time.monotonic() + within
        last = ""
        while True:
            out = self.admin("topic", "list").stdout
            lines = [ln for ln in out.splitlines() if len(ln.split()) > 1 and ln.split()[1] == topic]
            if lines and all(f"type {message_type.upper()}" in ln for ln in lines):
                return
            last = "; ".join(lines) or "not listed"
            if time.monotonic() >= deadline:
                raise Fail(
                    f"`admin topic list` to show topic {topic} with type {message_type.upper()} within "
                    f"{within} s of its creation, it shows: {last}"
                )
            time.sleep(0.2)

    def config_group(self, group, fifo=False, max_retries=None, retry_delays_ms=None):
        args = ["group", "config", "--group", group]
        if fifo:
            args.append("--fifo")
        if max_retries is not None:
            args += ["--max-retries", str(max_retries)]
        if retry_delays_ms:
            args += ["--retry-delays-ms", ",".join(str(d) for d in retry_delays_ms)]
        self.admin(*args)

    def dead_letter_ids(self, group):
        """Message ids in `admin dlq list --group G`, whose lines read (src/tools.rs print_message)
        `broker-a/0@3  id ID  tag "t"  keys [..]  props {"UNIQ_KEY": "ID2", ...}  body ...`: each
        line's `id` and its UNIQ_KEY property (RocketMQ's client message id, which a dead letter
        stored under an id of its own keeps). Returns (ids, raw output)."""
        p = self.admin("dlq", "list", "--group", group, "--count", "1000")
        ids = set(re.findall(r"\bid (\S+)", p.stdout))
        ids |= set(re.findall(r'"UNIQ_KEY": "([^"]+)"', p.stdout))
        return ids, p.stdout + p.stderr

    def cluster(self):
        """(broker group, leader node id or None, {node id: endpoint}) from `admin cluster`:
        `broker-a  term 3  leader 2 (127.0.0.1:p)` then `  node 1  127.0.0.1:p  Leader  ...`."""
        out = self.admin("cluster").stdout
        group, leader, nodes = None, None, {}
        for line in out.splitlines():
            m = re.match(r"^(\S+)\s+term (\d+)\s+leader (\S+)", line)
            if m and group is None:
                group = m.group(1)
                leader = int(m.group(3)) if m.group(3).isdigit() else None
                continue
            m = re.match(r"^\s+node (\d+)\s+(\S+)", line)
            if m and group is not None:
                nodes[int(m.group(1))] = m.group(2)
        return group, leader, nodes


# gRPC core sends a channel's target path as the HTTP/2 :authority. For a route Endpoints of
# several IPv4 addresses the SDK's target is "ipv4:h1:p1,h2:p2,..." (rpc_channel.py, sorted), so
# :authority is "h1:p1,h2:p2,...": more than one ':' outside brackets, which the `http` crate
# rejects, and hyper/tonic answer every such call with RST_STREAM PROTOCOL_ERROR.
AUTHORITY_HINT = (
    " [HTTP/2 PROTOCOL_ERROR from the server: if the route's Endpoints list several addresses, the "
    "SDK's channel sends :authority 'h1:p1,h2:p2,...', which hyper/tonic reject]"
)


def explain(text):
    """Appends what an opaque transport error usually means here."""
    if "RST_STREAM with error code 1" in text:
        return text + AUTHORITY_HINT
    return text


def err_text(e):
    """An exception as `Type: text` on one line, explained; a gRPC error as its code and details."""
    if callable(getattr(e, "code", None)) and callable(getattr(e, "details", None)):
        text = f"{type(e).__name__} {e.code().name}: {e.details()}"
    else:
        text = f"{type(e).__name__}: {e}"
    return explain(" ".join(text.split()))


def log(*parts):
    print(*parts, flush=True)


def die(code):
    """Exits without waiting for the SDK's non-daemon threads (thread pools joined at exit)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

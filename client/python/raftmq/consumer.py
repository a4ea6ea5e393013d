"""A clustering consumer-group member (ConsumerService in proto/), single-threaded.

The protocol, and how this class keeps it:

* Every heartbeat interval, heartbeat to the leader of every broker group that
  serves the topic, reporting each held queue with its offset: the *next* offset
  to consume, i.e. one past the last message handed to the caller. The leader
  commits it through Raft, so a successful heartbeat is a commit.
* The answer lists the queues this member may consume. A new one starts at the
  offset the answer gives; one already held keeps this member's own position
  unless the answer says ``reset``.
* A held queue missing from the answer is released: no more pulls, and a
  heartbeat goes out at once reporting it with ``held = false`` and its final
  offset (repeated until a heartbeat to that group succeeds). poll() has nothing
  in flight between calls (a message handed out counts as consumed), so a release
  never waits for the caller.
* A member that could not heartbeat a group for the session timeout stops
  consuming that group's queues (the leader may have given them away) and reports
  them released when it gets through again.
* ``close()`` heartbeats with ``leaving = true`` and the final offsets, so they are
  committed and the queues move to other members at once.

Delivery is at-least-once across failures: what was handed out after the last
successful heartbeat is handed out again by the next owner if this member dies.

Retries (RocketMQ's consumerSendMsgBack), as the Rust PushConsumer does them:

* ``send_back(message)`` hands a message the application failed to process to
  the leader of the broker group it came from, which stores it for the consumer
  group in ``%RETRY%<group>``, due after the group's backoff for its reconsume
  count, or, past the group's ``max_reconsume_times``, in ``%DLQ%<group>``.
* Unless ``consume_retry=False``, the Consumer is also a member of the same group
  on ``%RETRY%<group>`` (same client id, tag expression "*", from the first
  offset): a second member heartbeated and pulled alongside the first, whose
  messages come out of poll() with ``reconsume_times`` > 0 and the original
  topic in ``topic``. That topic exists on a broker group only once a first
  retry is stored there; until then the member keeps trying, quietly, on every
  heartbeat round.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from typing import Literal, Optional, Union

import grpc

from ._pb import pb
from .client import Client, RaftmqError, ReceivedMessage, error_from_rpc

QueueKey = tuple[str, int]  # (broker group, queue id)
StartFrom = Union[Literal["first", "last"], int]

#: Errors poll() raises instead of retrying: the request itself is wrong (bad
#: group name or tag expression, unreadable topic, a broker without consumer
#: groups), so retrying cannot help.
_FATAL = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.FAILED_PRECONDITION,  # only when not a not-leader answer, see _fatal
}


def _fatal(e: RaftmqError) -> bool:
    return e.code in _FATAL and not e.not_leader


def _not_there_yet(e: RaftmqError) -> bool:
    """The topic (or a broker group's copy of it) does not exist (yet): for the
    group's retry topic, the normal state until a first retry is stored."""
    return e.code == grpc.StatusCode.NOT_FOUND


def retry_topic(group: str) -> str:
    """The retry topic of a consumer group: ``%RETRY%<group>``."""
    return f"%RETRY%{group}"


def dlq_topic(group: str) -> str:
    """The dead-letter topic of a consumer group: ``%DLQ%<group>``."""
    return f"%DLQ%{group}"


def _default_client_id() -> str:
    host = "".join(c for c in socket.gethostname() if 32 < ord(c) < 127)[:200] or "host"
    return f"{host}@{os.getpid()}@py{random.randrange(1 << 32):08x}"


class _Member:
    """This member's view of one topic's queues: heartbeats and offsets.

    ``retry``: the group's retry topic, whose absence is expected and quiet."""

    def __init__(
        self,
        client: Client,
        group: str,
        client_id: str,
        topic: str,
        tag_expression: str,
        start: int,
        start_ts: int,
        *,
        retry: bool = False,
    ) -> None:
        self.client = client
        self.group = group
        self.client_id = client_id
        self.topic = topic
        self.tag_expression = tag_expression
        self._start, self._start_ts = start, start_ts
        self.retry = retry
        #: Queues held now -> next offset to consume.
        self.held: dict[QueueKey, int] = {}
        #: Released queues -> final offset, until a heartbeat to their group succeeds.
        self.released: dict[QueueKey, int] = {}
        #: Broker group -> when the last successful heartbeat to it was sent.
        self.last_ok: dict[str, float] = {}
        # Until a leader says otherwise (HeartbeatResponse carries both).
        self.interval = 1.0
        self.session_timeout = 5.0
        self.next_heartbeat = 0.0
        self.last_error: Optional[RaftmqError] = None

    def _quiet(self, e: RaftmqError) -> bool:
        return self.retry and _not_there_yet(e)

    def heartbeat_round(self) -> list[RaftmqError]:
        """One heartbeat to every broker group of the topic; schedules the next.

        Returns the errors, except the retry topic's expected absence."""
        errors: list[RaftmqError] = []
        settled = True
        absent = False
        try:
            groups = [g.name for g in self.client.route(self.topic).groups if g.readable]
        except RaftmqError as e:
            if _fatal(e):
                raise
            groups = []
            if self._quiet(e):
                absent = True
            else:
                settled = False
                errors.append(e)
        for name in groups:
            # A release is reported at once: heartbeat that group again right away.
            for _ in range(3):
                try:
                    released, rebalancing = self.heartbeat_group(name, leaving=False)
                except RaftmqError as e:
                    if _fatal(e):
                        raise
                    if self._quiet(e):
                        absent = True  # not there yet: ask again next round
                    else:
                        errors.append(e)
                        settled = False
                    break
                settled = settled and not rebalancing
                if not released:
                    break
        if errors:
            self.last_error = errors[-1]
        if errors or absent:
            self.client.invalidate_route(self.topic)
        self.fence()
        # Unsettled (a queue awaits release, the leader is in its grace period, a
        # leader did not answer): look again soon rather than a whole interval later.
        pause = self.interval if settled and not self.released else max(self.interval / 5, 0.02)
        self.next_heartbeat = time.monotonic() + pause
        return errors

    def heartbeat_group(self, name: str, *, leaving: bool) -> tuple[bool, bool]:
        """Heartbeats broker group ``name``'s leader and applies the answer.

        Returns (released something, rebalancing). Raises RaftmqError on failure."""
        queues: dict[int, pb.HeldQueue] = {}
        reported_released = [k for k in self.released if k[0] == name]
        for key in reported_released:
            queues[key[1]] = pb.HeldQueue(queue_id=key[1], offset=self.released[key], held=False)
        for (g, q), offset in self.held.items():
            if g == name:  # held wins if a queue were somehow in both (never reported twice)
                queues[q] = pb.HeldQueue(queue_id=q, offset=offset, held=not leaving)
        req = pb.HeartbeatRequest(
            consumer_group=self.group,
            client_id=self.client_id,
            topic=self.topic,
            tag_expression=self.tag_expression,
            start_from=self._start,
            start_timestamp_ms=self._start_ts,
            queues=[queues[q] for q in sorted(queues)],
            leaving=leaving,
        )
        sent_at = time.monotonic()
        # Each request gets rpc_timeout (a silent leader is passed over for its
        # replicas after it); the whole heartbeat stays well inside the session
        # timeout, so one hung leader cannot make this member fence itself.
        resp, _, _ = self.client.call_leader(
            self.topic,
            name,
            lambda ep, t: self.client.consumer_service(ep).Heartbeat(req, timeout=t),
            deadline=max(min(self.client.send_deadline, self.session_timeout / 2), self.client.rpc_timeout),
        )
        self.last_ok[name] = sent_at
        if resp.heartbeat_interval_ms:
            self.interval = max(resp.heartbeat_interval_ms, 20) / 1000
        if resp.session_timeout_ms:
            self.session_timeout = max(resp.session_timeout_ms, 100) / 1000
        for key in reported_released:
            self.released.pop(key, None)
        if leaving:
            for key in [k for k in self.held if k[0] == name]:
                del self.held[key]
            return False, False
        assigned = {a.queue_id: a for a in resp.assigned}
        released = False
        for key in [k for k in self.held if k[0] == name]:
            if key[1] not in assigned:
                # Revoked: nothing is in flight between polls, so release now.
                self.released[key] = self.held.pop(key)
                released = True
        for q, a in assigned.items():
            key = (name, q)
            if key in self.released:
                continue  # released in this very answer; it may come back later
            if key not in self.held or a.reset:
                self.held[key] = a.offset
        return released, resp.rebalancing

    def fence(self) -> None:
        """Stops consuming groups not heard from for the session timeout."""
        now = time.monotonic()
        for key in list(self.held):
            if now - self.last_ok.get(key[0], float("-inf")) >= self.session_timeout:
                self.released[key] = self.held.pop(key)

    def leave(self) -> list[RaftmqError]:
        """Heartbeats ``leaving`` to every group that knows this member."""
        # Every group that knows this member: it holds or released queues there, or
        # a heartbeat got through (a member with no queues still counts in shares).
        names = {k[0] for k in self.held} | {k[0] for k in self.released} | set(self.last_ok)
        errors: list[RaftmqError] = []
        for name in sorted(names):
            try:
                self.heartbeat_group(name, leaving=True)
            except RaftmqError as e:
                if not self._quiet(e):
                    errors.append(e)
        self.held.clear()
        self.released.clear()
        return errors


class Consumer:
    """One member of consumer group ``group`` on ``topic`` (clustering model).

    ``start_from``: where the group starts in a queue it never committed an offset
    for: "first", "last", or a timestamp in ms since the epoch. ``pull_batch``: most
    messages per queue per pull. ``consume_retry`` (default True): also consume
    the group's retry topic ``%RETRY%<group>`` (see the module docs and
    ``send_back``). Not thread-safe: call poll/commit/send_back/close from one
    thread (the Client it uses may be shared).
    """

    def __init__(
        self,
        client: Client,
        group: str,
        topic: str,
        tag_expression: str = "*",
        start_from: StartFrom = "first",
        *,
        client_id: Optional[str] = None,
        pull_batch: int = 32,
        consume_retry: bool = True,
    ) -> None:
        self.client = client
        self.group = group
        self.topic = topic
        self.tag_expression = tag_expression or "*"
        if start_from == "first":
            start, start_ts = pb.START_FROM_FIRST, 0
        elif start_from == "last":
            start, start_ts = pb.START_FROM_LAST, 0
        elif isinstance(start_from, int) and not isinstance(start_from, bool) and start_from >= 0:
            start, start_ts = pb.START_FROM_TIMESTAMP, start_from
        else:
            raise ValueError(f'start_from must be "first", "last" or a timestamp in ms, not {start_from!r}')
        self.client_id = client_id or _default_client_id()
        self.pull_batch = pull_batch
        self.retry_topic = retry_topic(group)
        self._main = _Member(client, group, self.client_id, topic, self.tag_expression, start, start_ts)
        #: The member on %RETRY%<group>: every message there is this group's and due.
        self._retry: Optional[_Member] = (
            _Member(client, group, self.client_id, self.retry_topic, "*", pb.START_FROM_FIRST, 0, retry=True)
            if consume_retry and topic != self.retry_topic
            else None
        )
        self._members = [self._main] + ([self._retry] if self._retry else [])
        self._closed = False

    # -- public API ---------------------------------------------------------

    @property
    def last_error(self) -> Optional[RaftmqError]:
        """The last transient error (heartbeat or pull), for diagnostics."""
        errs = [m.last_error for m in self._members if m.last_error is not None]
        return errs[-1] if errs else None

    @property
    def assignment(self) -> dict[QueueKey, int]:
        """The queues of ``topic`` held now and the next offset of each (a copy)."""
        return dict(self._main.held)

    @property
    def retry_assignment(self) -> dict[QueueKey, int]:
        """The queues of ``%RETRY%<group>`` held now (empty without consume_retry)."""
        return dict(self._retry.held) if self._retry else {}

    def poll(self, timeout_s: float = 1.0) -> list[ReceivedMessage]:
        """Messages from the assigned queues, waiting up to ``timeout_s`` for some.

        Heartbeats when due (so call poll at least every heartbeat interval, or the
        member is presumed dead after the session timeout). Messages returned count
        as consumed: the next heartbeat (or commit/close) reports offsets past them.
        Retries from ``%RETRY%<group>`` come out here too (``reconsume_times`` > 0).
        Raises RaftmqError for requests that retrying cannot fix."""
        if self._closed:
            raise RuntimeError("consumer is closed")
        end = time.monotonic() + max(timeout_s, 0.0)
        while True:
            for m in self._members:
                if time.monotonic() >= m.next_heartbeat:
                    m.heartbeat_round()
            for m in self._members:
                m.fence()
            now = time.monotonic()
            next_heartbeat = min(m.next_heartbeat for m in self._members)
            until = max(min(end, next_heartbeat) - now, 0.0)
            if any(m.held for m in self._members):
                out, failed = self._pull_held(until)
                if out:
                    return out
                if failed:  # do not spin on a failing node
                    time.sleep(min(0.05, max(end - time.monotonic(), 0.0)))
            elif until > 0:
                time.sleep(until)
            if time.monotonic() >= end:
                return []

    def send_back(self, message: ReceivedMessage, delay_ms: int = 0) -> bool:
        """Hands a polled message the application failed to process back to the
        broker (RocketMQ's consumerSendMsgBack); returns whether it was dead-lettered.

        The leader of the broker group the message came from stores it for this
        group in ``%RETRY%<group>``, due after the group's backoff for
        ``reconsume_times`` + 1 (``delay_ms`` > 0 overrides it), from where poll()
        hands it out again; past the group's ``max_reconsume_times`` it goes to
        ``%DLQ%<group>`` instead (True). Follows the leader like a send, within the
        client's send_deadline; raises RaftmqError if it could not be stored (a
        send-back whose answer was lost may have been stored, so a retry can come
        twice). Works after close() too, for messages polled before it."""
        if not isinstance(delay_ms, int) or isinstance(delay_ms, bool) or delay_ms < 0:
            raise ValueError(f"delay_ms must be a non-negative int, not {delay_ms!r}")
        if not message.broker_group:
            raise ValueError("the message names no broker group: pass one poll() returned")
        req = pb.SendBackRequest(
            consumer_group=self.group,
            message_id=message.message_id,
            reconsume_times=message.reconsume_times,
            delay_ms=delay_ms,
        )
        # Routed by the topic it was pulled from: a retry (reconsume_times > 0)
        # came from the retry topic, which lives on the same broker group.
        topic = self.retry_topic if message.reconsume_times > 0 else self.topic
        resp, _, _ = self.client.call_leader(
            topic,
            message.broker_group,
            lambda ep, t: self.client.consumer_service(ep).SendBack(req, timeout=t),
            deadline=self.client.send_deadline,
        )
        return bool(resp.dead_lettered)

    def commit(self) -> None:
        """Heartbeats now, so the offsets of everything polled so far are committed.

        Raises the first error if some broker group could not be reached (its
        offsets are reported again on the next heartbeat)."""
        if self._closed:
            raise RuntimeError("consumer is closed")
        errors: list[RaftmqError] = []
        for m in self._members:
            errors.extend(m.heartbeat_round())
        if errors:
            raise errors[0]

    def close(self) -> None:
        """Leaves the group: final offsets committed, queues handed on at once.

        Idempotent. Raises the first error if a broker group could not be told; its
        queues then move after the session timeout, from the last committed offsets."""
        if self._closed:
            return
        self._closed = True
        errors: list[RaftmqError] = []
        for m in self._members:
            errors.extend(m.leave())
        if errors:
            raise errors[0]

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            self.close()
        except RaftmqError:
            if exc_type is None:
                raise
            # Leaving failed while an exception propagates: let that one through.

    # -- pulls --------------------------------------------------------------

    def _pull_held(self, wait_s: float) -> tuple[list[ReceivedMessage], bool]:
        """Pulls every held queue (of both topics); returns the messages and whether
        a pull failed.

        First every queue at once without waiting, all answers used (so a busy
        queue cannot starve the others). If none had anything, every queue again as
        a long poll of up to ``wait_s``: the first answer is used and the other
        pulls are cancelled (a pull changes nothing on the broker, and an offset
        only moves for an answer that was used)."""
        out, failed = self._pull_round(0, first_only=False)
        if out or failed or wait_s < 0.01:
            return out, failed
        return self._pull_round(wait_s, first_only=True)

    def _pull_round(self, wait_s: float, *, first_only: bool) -> tuple[list[ReceivedMessage], bool]:
        done = threading.Event()
        calls: list[tuple[_Member, QueueKey, int, str, grpc.Future]] = []
        failed = False
        for member in self._members:
            for key, offset in list(member.held.items()):
                try:
                    # A dead or unknown leader is not waited on: its replicas name the new one.
                    endpoint = self.client.find_leader(member.topic, key[0])
                except RaftmqError as e:
                    member.last_error, failed = e, True
                    continue
                req = pb.PullRequest(
                    topic=member.topic,
                    queue_id=key[1],
                    offset=offset,
                    max_messages=self.pull_batch,
                    max_wait_ms=int(wait_s * 1000),
                    tag_expression=member.tag_expression,
                )
                fut = self.client.messaging(endpoint).Pull.future(req, timeout=self.client.rpc_timeout + wait_s)
                fut.add_done_callback(lambda _f: done.set())
                calls.append((member, key, offset, endpoint, fut))
        if first_only and calls:
            done.wait(self.client.rpc_timeout + wait_s + 0.5)
        out: list[ReceivedMessage] = []
        for member, key, offset, endpoint, fut in calls:
            if first_only and not fut.done():
                fut.cancel()
                continue
            try:
                resp = fut.result()  # waits (bounded by the call's timeout) when not first_only
            except grpc.FutureCancelledError:
                continue
            except grpc.RpcError as e:
                err = error_from_rpc(e, endpoint)
                member.last_error, failed = err, True
                if err.not_leader and err.leader:
                    if not self.client.is_dead(err.leader):
                        self.client.set_leader(key[0], err.leader)
                elif err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    # The next round asks its replicas who leads instead.
                    self.client.endpoint_failed(endpoint)
                    self.client.forget_leader(key[0], endpoint)
                continue
            if member.held.get(key) != offset:
                continue  # cannot happen single-threaded; never move an offset twice
            out.extend(ReceivedMessage.from_pb(m, key[0]) for m in resp.messages)
            # Past the returned messages and the filtered-out ones; never backwards
            # (a reset arrives through a heartbeat, not a pull).
            member.held[key] = max(offset, resp.next_offset)
        return out, failed

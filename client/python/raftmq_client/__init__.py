"""raftmq_client: a small Python client for raftmq, built only from proto/.

* `Client` asks NameServers where a topic lives (QueryRoute), caches the answer per
  topic, and keeps one gRPC channel per endpoint.
* `Producer.send` goes to the broker group's leader. A follower answers
  FAILED_PRECONDITION with metadata `raftmq-leader` naming the leader: the producer
  redirects there at once. UNAVAILABLE, timeouts and an unknown leader refresh the
  route and retry with backoff until a deadline.
* `Client.pull` reads one queue by offset.
* `Consumer` is a clustering consumer-group member (the ConsumerService protocol in
  proto/): it heartbeats to each broker group's leader, consumes only the queues it
  is assigned, reports consumed offsets (the leader commits them through Raft) and
  releases revoked queues with their final offset. Single-threaded: `poll()` hands
  messages to the caller, and a message handed out counts as consumed.
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional

import grpc

from . import _stubs

pb, pb_grpc = _stubs.load()

LEADER_METADATA_KEY = "raftmq-leader"

__all__ = [
    "Client",
    "Consumer",
    "Producer",
    "RaftmqError",
    "SendResult",
    "LEADER_METADATA_KEY",
    "pb",
    "pb_grpc",
]


class RaftmqError(Exception):
    """A request failed: the gRPC code, the server's message, and who answered."""

    def __init__(self, code: grpc.StatusCode, message: str, endpoint: str = "", leader: Optional[str] = None):
        super().__init__(f"{endpoint or 'raftmq'} answered {code.name}: {message}")
        self.code = code
        self.message = message
        self.endpoint = endpoint
        #: The `raftmq-leader` metadata of a not-leader answer ("" if the node did
        #: not know the leader); None for every other answer.
        self.leader = leader

    @property
    def retriable(self) -> bool:
        return self.code in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.ABORTED,
            grpc.StatusCode.CANCELLED,
        )


def _error(e: grpc.RpcError, endpoint: str) -> RaftmqError:
    leader = None
    for md in (e.initial_metadata() or (), e.trailing_metadata() or ()):
        for key, value in md:
            if key == LEADER_METADATA_KEY:
                leader = value
    return RaftmqError(e.code(), e.details() or "", endpoint, leader)


@dataclass
class SendResult:
    message_id: str
    broker_group: str
    queue_id: int
    queue_offset: int


@dataclass
class _Route:
    topic: str
    groups: list  # of pb.GroupRoute, sorted by name
    fetched_at: float = field(default_factory=time.monotonic)


class Client:
    """Shared connections and routes; make producers and consumers from it."""

    def __init__(self, nameservers: Iterable[str], timeout: float = 3.0, deadline: float = 10.0):
        self.nameservers = list(nameservers)
        if not self.nameservers:
            raise ValueError("at least one NameServer address (host:port) is needed")
        #: One RPC's timeout, and the total time a send may take with retries.
        self.timeout = timeout
        self.deadline = deadline
        self._channels: dict[str, grpc.Channel] = {}
        self._routes: dict[str, _Route] = {}
        self._leaders: dict[tuple[str, str], str] = {}

    def close(self) -> None:
        for ch in self._channels.values():
            ch.close()
        self._channels.clear()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def channel(self, endpoint: str) -> grpc.Channel:
        ch = self._channels.get(endpoint)
        if ch is None:
            # Pulls may carry messages up to 4 MiB each: lift the 4 MiB default.
            ch = grpc.insecure_channel(endpoint, options=[("grpc.max_receive_message_length", 64 << 20)])
            self._channels[endpoint] = ch
        return ch

    def messaging(self, endpoint: str):
        return pb_grpc.MessagingServiceStub(self.channel(endpoint))

    def route(self, topic: str, refresh: bool = False) -> _Route:
        """The topic's route from the first NameServer that answers; cached 30 s."""
        cached = self._routes.get(topic)
        if cached and not refresh and time.monotonic() - cached.fetched_at < 30:
            return cached
        last: Optional[RaftmqError] = None
        for ns in self.nameservers:
            stub = pb_grpc.NameServerServiceStub(self.channel(ns))
            try:
                resp = stub.QueryRoute(pb.QueryRouteRequest(topic=topic), timeout=self.timeout)
            except grpc.RpcError as e:
                last = _error(e, ns)
                continue
            route = _Route(topic, sorted(resp.groups, key=lambda g: g.broker_group))
            self._routes[topic] = route
            return route
        if last is not None and last.code == grpc.StatusCode.NOT_FOUND:
            # No NameServer knows the topic yet; a broker may create it on first
            # send. A provisional route over every live group (not cached, queue
            # counts unknown) lets that first send reach one.
            return self._provisional_route(topic)
        raise last or RaftmqError(grpc.StatusCode.UNAVAILABLE, "no NameServer answered")

    def _provisional_route(self, topic: str) -> _Route:
        for ns in self.nameservers:
            stub = pb_grpc.NameServerServiceStub(self.channel(ns))
            try:
                resp = stub.ListCluster(pb.ListClusterRequest(), timeout=self.timeout)
            except grpc.RpcError:
                continue
            groups = [
                pb.GroupRoute(
                    broker_group=g.broker_group,
                    leader_endpoint=g.leader_endpoint,
                    follower_endpoints=[r.endpoint for r in g.replicas if r.endpoint != g.leader_endpoint],
                )
                for g in resp.groups
            ]
            if groups:
                return _Route(topic, sorted(groups, key=lambda g: g.broker_group))
        raise RaftmqError(grpc.StatusCode.NOT_FOUND, f"no NameServer knows topic {topic!r} and no broker group is live")

    def leader_of(self, topic: str, group: str) -> str:
        """Where writes for `group` go: a leader learned from a redirect beats the route."""
        known = self._leaders.get((topic, group))
        if known:
            return known
        for g in self.route(topic).groups:
            if g.broker_group == group:
                return g.leader_endpoint or (g.follower_endpoints[0] if g.follower_endpoints else "")
        raise RaftmqError(grpc.StatusCode.NOT_FOUND, f"broker group {group!r} serves no queue of {topic!r}")

    def set_leader(self, topic: str, group: str, endpoint: str) -> None:
        """Believe `endpoint` leads `group` (a redirect said so, or a test forces it)."""
        self._leaders[(topic, group)] = endpoint

    def forget_leader(self, topic: str, group: str) -> None:
        self._leaders.pop((topic, group), None)

    def producer(self) -> "Producer":
        return Producer(self)

    def pull(
        self,
        topic: str,
        broker_group: str,
        queue_id: int,
        offset: int,
        max_messages: int = 32,
        max_wait_ms: int = 0,
        tag_expression: str = "*",
    ):
        """One Pull from the group's leader; returns the PullResponse."""
        endpoint = self.leader_of(topic, broker_group)
        req = pb.PullRequest(
            topic=topic,
            queue_id=queue_id,
            offset=offset,
            max_messages=max_messages,
            max_wait_ms=max_wait_ms,
            tag_expression=tag_expression,
        )
        try:
            return self.messaging(endpoint).Pull(req, timeout=self.timeout + max_wait_ms / 1000)
        except grpc.RpcError as e:
            err = _error(e, endpoint)
            if err.retriable:
                self.forget_leader(topic, broker_group)
                self.route(topic, refresh=True)
            raise err from None


class Producer:
    """Sends to a broker group's leader, following redirects, within a deadline."""

    def __init__(self, client: Client):
        self.client = client
        self._next = random.randrange(1 << 16)

    def send(
        self,
        topic: str,
        body: bytes,
        tag: str = "",
        keys: Iterable[str] = (),
        properties: Optional[dict] = None,
        queue_id: Optional[int] = None,
        broker_group: Optional[str] = None,
    ) -> SendResult:
        msg = pb.Message(
            topic=topic,
            tag=tag,
            keys=list(keys),
            properties=properties or {},
            body=body,
            born_timestamp_ms=int(time.time() * 1000),
        )
        started = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            groups = self.client.route(topic, refresh=attempt > 1).groups
            if broker_group is None and not groups:
                raise RaftmqError(grpc.StatusCode.NOT_FOUND, f"no broker group serves topic {topic!r}")
            group = broker_group or groups[self._next % len(groups)].broker_group
            endpoint = self.client.leader_of(topic, group)
            err = None
            for _redirect in range(3):
                req = pb.SendRequest(topic=topic, messages=[msg])
                if queue_id is not None:
                    req.queue_id = queue_id
                try:
                    resp = self.client.messaging(endpoint).Send(req, timeout=self.client.timeout)
                except grpc.RpcError as e:
                    err = _error(e, endpoint)
                    if err.code == grpc.StatusCode.FAILED_PRECONDITION and err.leader:
                        # A follower named the leader: go there now, no route refresh.
                        self.client.set_leader(topic, group, err.leader)
                        endpoint = err.leader
                        continue
                    break
                self._next += 1
                r = resp.results[0]
                return SendResult(r.message_id, group, r.queue_id, r.queue_offset)
            leaderless = err.code == grpc.StatusCode.FAILED_PRECONDITION and err.leader == ""
            if not (err.retriable or leaderless):
                raise err
            self.client.forget_leader(topic, group)
            pause = min(0.01 * 2**attempt, 0.5)
            if time.monotonic() + pause - started > self.client.deadline:
                raise err
            time.sleep(pause)


class Consumer:
    """A clustering consumer-group member (see the module docs)."""

    def __init__(
        self,
        client: Client,
        group: str,
        topic: str,
        tag_expression: str = "*",
        start_from: str = "first",
        client_id: Optional[str] = None,
        batch: int = 32,
    ):
        self.client = client
        self.group = group
        self.topic = topic
        self.tag_expression = tag_expression
        self.start_from = {
            "first": pb.START_FROM_FIRST,
            "last": pb.START_FROM_LAST,
        }[start_from]
        self.client_id = client_id or f"{socket.gethostname()}@{os.getpid()}@py{random.randrange(1 << 32):08x}"
        self.batch = batch
        #: (broker group, queue) -> next offset to consume, for queues held now.
        self.offsets: dict[tuple[str, int], int] = {}
        #: Released queues whose final offset no heartbeat has delivered yet.
        self._released: dict[tuple[str, int], int] = {}
        self._interval = 1.0
        self._session_timeout = 5.0
        self._next_heartbeat = 0.0
        self._last_ok: dict[str, float] = {}

    def _heartbeat(self, leaving: bool = False) -> None:
        for g in self.client.route(self.topic).groups:
            name = g.broker_group
            queues = [
                pb.HeldQueue(queue_id=q, offset=o, held=not leaving)
                for (grp, q), o in self.offsets.items()
                if grp == name
            ] + [pb.HeldQueue(queue_id=q, offset=o, held=False) for (grp, q), o in self._released.items() if grp == name]
            req = pb.HeartbeatRequest(
                consumer_group=self.group,
                client_id=self.client_id,
                topic=self.topic,
                tag_expression=self.tag_expression,
                start_from=self.start_from,
                queues=queues,
                leaving=leaving,
            )
            resp = None
            endpoint = self.client.leader_of(self.topic, name)
            for _redirect in range(3):
                try:
                    resp = pb_grpc.ConsumerServiceStub(self.client.channel(endpoint)).Heartbeat(
                        req, timeout=self.client.timeout * 2
                    )
                    break
                except grpc.RpcError as e:
                    err = _error(e, endpoint)
                    if err.code == grpc.StatusCode.FAILED_PRECONDITION and err.leader:
                        self.client.set_leader(self.topic, name, err.leader)
                        endpoint = err.leader
                        continue
                    self.client.forget_leader(self.topic, name)
                    break
            if resp is None:
                # Cannot reach the leader: past the session timeout the queues may be
                # someone else's, so stop consuming them.
                if time.monotonic() - self._last_ok.get(name, time.monotonic()) > self._session_timeout:
                    for key in [k for k in self.offsets if k[0] == name]:
                        del self.offsets[key]
                continue
            self._last_ok[name] = time.monotonic()
            self._interval = max(resp.heartbeat_interval_ms, 20) / 1000
            self._session_timeout = max(resp.session_timeout_ms, 100) / 1000
            for key in [k for k in self._released if k[0] == name]:
                del self._released[key]
            if leaving:
                continue
            assigned = {a.queue_id: a for a in resp.assigned}
            for key in [k for k in self.offsets if k[0] == name]:
                if key[1] not in assigned:
                    # Revoked. Everything handed out counts as consumed, so release now.
                    self._released[key] = self.offsets.pop(key)
                    self._next_heartbeat = 0.0
            for q, a in assigned.items():
                key = (name, q)
                if key not in self.offsets or a.reset:
                    self.offsets[key] = a.offset
            if resp.rebalancing:
                self._next_heartbeat = min(self._next_heartbeat, time.monotonic() + self._interval / 5)

    def poll(self, timeout: float = 1.0) -> list:
        """Up to `batch` messages per held queue (PulledMessage), waiting up to `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            if now >= self._next_heartbeat:
                self._next_heartbeat = now + self._interval
                try:
                    self._heartbeat()
                except RaftmqError:
                    self.client.route(self.topic, refresh=True)
            out = []
            for (name, q), offset in list(self.offsets.items()):
                try:
                    resp = self.client.pull(self.topic, name, q, offset, self.batch, 0, self.tag_expression)
                except RaftmqError:
                    continue
                if (name, q) in self.offsets:
                    self.offsets[(name, q)] = max(offset, resp.next_offset)
                out.extend(resp.messages)
            if out or time.monotonic() >= deadline:
                return out
            time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))

    def commit(self) -> None:
        """Reports the consumed offsets now (the leader commits them through Raft)."""
        self._heartbeat()

    def close(self) -> None:
        """Commits the final offsets and leaves the group, so its queues move at once."""
        self._heartbeat(leaving=True)
        self.offsets.clear()

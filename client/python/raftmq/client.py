"""Connections, routes, sends and pulls.

Everything here follows proto/raftmq/v1/messaging.proto, the whole wire contract:

* Routes come from NameServerService.QueryRoute, cached per topic (they change on
  failover and topic creation, not per request) and fetched again after an error.
* Writes must reach a broker group's leader. A follower answers FAILED_PRECONDITION
  with metadata ``raftmq-leader`` naming the leader, so the client redirects at once
  instead of waiting for the NameServer to learn of an election.
* UNAVAILABLE (node down, election under way) and a not-leader answer that names
  no leader are transient: refresh the route, back off briefly, retry until a
  deadline. Anything else is the caller's problem and raised as RaftmqError.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc

from ._pb import pb, pb_grpc

T = TypeVar("T")

#: Metadata key of a not-leader answer: the leader's endpoint, empty while unknown.
LEADER_METADATA_KEY = "raftmq-leader"

#: Redirects followed in a row before a call falls back to refresh-and-backoff:
#: two stale nodes naming each other must not loop.
MAX_REDIRECTS = 5

_PERM_WRITE = 2
_PERM_READ = 4


class RaftmqError(Exception):
    """A request failed; carries the gRPC status so callers can decide what to do.

    ``leader`` is the ``raftmq-leader`` metadata value when the answer had one
    ("" = the node did not know the leader), else None.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        endpoint: str = "",
        leader: Optional[str] = None,
    ) -> None:
        where = f"{endpoint}: " if endpoint else ""
        super().__init__(f"{where}{code.name}: {message}")
        self.code = code
        self.message = message
        self.endpoint = endpoint
        self.leader = leader

    @property
    def not_leader(self) -> bool:
        """The answering node is a follower (FAILED_PRECONDITION with ``raftmq-leader``)."""
        return self.code == grpc.StatusCode.FAILED_PRECONDITION and self.leader is not None

    @property
    def transient(self) -> bool:
        """Worth retrying after a route refresh: the node is down, or leaderless."""
        return self.code == grpc.StatusCode.UNAVAILABLE or (self.not_leader and not self.leader)


def _metadata_value(call: grpc.Call, key: str) -> Optional[str]:
    # tonic sends a status's metadata as trailers (trailers-only responses), but
    # the contract only says "metadata", so look at the initial metadata as well.
    for getter in (call.trailing_metadata, call.initial_metadata):
        try:
            items = getter() or ()
        except Exception:  # an RpcError that is not a Call (e.g. a client-side failure)
            continue
        for k, v in items:
            if k == key:
                return v.decode() if isinstance(v, bytes) else v
    return None


def error_from_rpc(e: grpc.RpcError, endpoint: str = "") -> RaftmqError:
    """Converts a grpc.RpcError into a RaftmqError (code, details, leader metadata)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = e.details() if hasattr(e, "details") else str(e)
    leader = _metadata_value(e, LEADER_METADATA_KEY) if isinstance(e, grpc.Call) else None
    return RaftmqError(code or grpc.StatusCode.UNKNOWN, details or "", endpoint=endpoint, leader=leader)


def backoff(attempt: int) -> float:
    """Pause before retry ``attempt`` (1, 2, ...): 20 ms doubling to 250 ms.

    An election takes a few hundred ms and a refused call costs about one, so long
    pauses would only add their own length to the failover a caller sees.
    """
    return min(0.02 * (2 ** max(attempt - 1, 0)), 0.25)


@dataclass(frozen=True, slots=True)
class GroupRoute:
    """One broker group serving a topic, as the NameServer last saw it."""

    name: str
    leader: str  # "" while the group has no known leader
    followers: tuple[str, ...]
    queues: int  # 0 in a provisional route (topic not known yet)
    perm: int  # pb.Permission value; 0 (unspecified) means read-write

    @property
    def writable(self) -> bool:
        return self.perm == 0 or bool(self.perm & _PERM_WRITE)

    @property
    def readable(self) -> bool:
        return self.perm == 0 or bool(self.perm & _PERM_READ)


@dataclass(frozen=True, slots=True)
class TopicRoute:
    """Where a topic lives. ``provisional``: no NameServer knows the topic yet; the
    groups are every live group (from ListCluster) so a first send can reach a broker
    that auto-creates topics; it is never cached."""

    topic: str
    groups: tuple[GroupRoute, ...]  # sorted by name
    provisional: bool = False
    fetched_at: float = field(default_factory=time.monotonic)

    def group(self, name: str) -> Optional[GroupRoute]:
        for g in self.groups:
            if g.name == name:
                return g
        return None


@dataclass(frozen=True, slots=True)
class SendResult:
    """Where a sent message was stored; ``message_id`` is what a pull returns too."""

    message_id: str
    broker_group: str
    queue_id: int
    queue_offset: int


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A stored message as a pull or a consumer returns it."""

    topic: str
    tag: str
    keys: tuple[str, ...]
    properties: dict[str, str]
    body: bytes
    born_timestamp_ms: int
    message_id: str
    broker_group: str
    queue_id: int
    queue_offset: int
    store_timestamp_ms: int

    @classmethod
    def from_pb(cls, m: "pb.PulledMessage", broker_group: str) -> "ReceivedMessage":
        msg = m.message
        return cls(
            topic=msg.topic,
            tag=msg.tag,
            keys=tuple(msg.keys),
            properties=dict(msg.properties),
            body=bytes(msg.body),
            born_timestamp_ms=msg.born_timestamp_ms,
            message_id=m.message_id,
            broker_group=broker_group,
            queue_id=m.queue_id,
            queue_offset=m.queue_offset,
            store_timestamp_ms=m.store_timestamp_ms,
        )


@dataclass(frozen=True, slots=True)
class PullResult:
    """One pull's answer. ``next_offset`` is where to pull next: past the returned
    messages and past any the tag filter skipped."""

    messages: list[ReceivedMessage]
    next_offset: int
    min_offset: int
    max_offset: int


@dataclass(frozen=True, slots=True)
class QueueOffset:
    """A consumer group's committed offset in one queue (None: never committed)."""

    committed: Optional[int]
    min_offset: int
    max_offset: int


class Client:
    """Shared NameServer routes and gRPC channels; make producers and consumers from it.

    Thread-safe (the Consumer is not). One channel per endpoint, reused by every
    call, since gRPC multiplexes calls over one HTTP/2 connection.

    ``rpc_timeout``: one call's timeout (seconds). ``send_deadline``: total time a
    send may spend on redirects, route refreshes and backoff. ``route_ttl``: how long
    a cached route is trusted before it is asked for again.
    """

    def __init__(
        self,
        nameservers: Union[Sequence[str], str],
        *,
        rpc_timeout: float = 3.0,
        send_deadline: float = 10.0,
        route_ttl: float = 30.0,
    ) -> None:
        if isinstance(nameservers, str):
            nameservers = [a for a in nameservers.replace(";", ",").split(",") if a.strip()]
        self.nameservers = [a.strip() for a in nameservers]
        if not self.nameservers:
            raise ValueError("at least one NameServer address (host:port) is needed")
        self.rpc_timeout = rpc_timeout
        self.send_deadline = send_deadline
        self.route_ttl = route_ttl
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._routes: dict[str, TopicRoute] = {}
        # Broker group -> leader endpoint learned from a redirect (or set by
        # set_leader); it beats the route's leader until a call to it fails.
        self._leaders: dict[str, str] = {}
        self._closed = False

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Closes every channel; the client is unusable afterwards."""
        with self._lock:
            self._closed = True
            channels, self._channels = self._channels, {}
        for ch in channels.values():
            ch.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def channel(self, endpoint: str) -> grpc.Channel:
        """The one channel to ``endpoint`` (host:port), created on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("raftmq Client is closed")
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = grpc.insecure_channel(
                    endpoint,
                    options=[
                        # A pull carries at least one message if any matches, and a
                        # body may be 4 MiB: gRPC's 4 MiB default would refuse it.
                        ("grpc.max_receive_message_length", 64 << 20),
                        ("grpc.max_send_message_length", 64 << 20),
                        # A restarted node must be retried within a failover's time,
                        # not after gRPC's default reconnect backoff (1 s .. 120 s).
                        ("grpc.initial_reconnect_backoff_ms", 100),
                        ("grpc.min_reconnect_backoff_ms", 100),
                        ("grpc.max_reconnect_backoff_ms", 1000),
                    ],
                )
                self._channels[endpoint] = ch
            return ch

    def messaging(self, endpoint: str) -> "pb_grpc.MessagingServiceStub":
        return pb_grpc.MessagingServiceStub(self.channel(endpoint))

    def consumer_service(self, endpoint: str) -> "pb_grpc.ConsumerServiceStub":
        return pb_grpc.ConsumerServiceStub(self.channel(endpoint))

    # -- routes and leaders -------------------------------------------------

    def route(self, topic: str, *, refresh: bool = False) -> TopicRoute:
        """The topic's route: cached for ``route_ttl`` unless ``refresh``.

        NameServers are asked in order; the first answer wins. A topic none of them
        knows gets a provisional route (see TopicRoute)."""
        if not refresh:
            with self._lock:
                cached = self._routes.get(topic)
            if cached is not None and time.monotonic() - cached.fetched_at < self.route_ttl:
                return cached
        last: Optional[RaftmqError] = None
        unknown = False
        for ns in self.nameservers:
            try:
                resp = pb_grpc.NameServerServiceStub(self.channel(ns)).QueryRoute(
                    pb.QueryRouteRequest(topic=topic), timeout=self.rpc_timeout
                )
            except grpc.RpcError as e:
                err = error_from_rpc(e, ns)
                if err.code == grpc.StatusCode.INVALID_ARGUMENT:
                    raise err from None
                if err.code == grpc.StatusCode.NOT_FOUND:
                    unknown = True
                last = err
                continue
            if not resp.groups:
                unknown = True
                continue
            route = TopicRoute(
                topic,
                tuple(
                    sorted(
                        (
                            GroupRoute(g.broker_group, g.leader_endpoint, tuple(g.follower_endpoints), g.queues, g.perm)
                            for g in resp.groups
                        ),
                        key=lambda g: g.name,
                    )
                ),
            )
            with self._lock:
                self._routes[topic] = route
            return route
        if unknown:
            return self._provisional_route(topic)
        raise last or RaftmqError(grpc.StatusCode.UNAVAILABLE, "no NameServer answered")

    def _provisional_route(self, topic: str) -> TopicRoute:
        last: Optional[RaftmqError] = None
        for ns in self.nameservers:
            try:
                resp = pb_grpc.NameServerServiceStub(self.channel(ns)).ListCluster(
                    pb.ListClusterRequest(), timeout=self.rpc_timeout
                )
            except grpc.RpcError as e:
                last = error_from_rpc(e, ns)
                continue
            groups = tuple(
                sorted(
                    (
                        GroupRoute(
                            g.broker_group,
                            g.leader_endpoint,
                            tuple(r.endpoint for r in g.replicas if r.endpoint and r.endpoint != g.leader_endpoint),
                            0,
                            pb.PERMISSION_READ_WRITE,
                        )
                        for g in resp.groups
                    ),
                    key=lambda g: g.name,
                )
            )
            if groups:
                return TopicRoute(topic, groups, provisional=True)
            last = RaftmqError(grpc.StatusCode.NOT_FOUND, f"no NameServer knows topic {topic!r} and no broker group is live")
        raise last or RaftmqError(grpc.StatusCode.UNAVAILABLE, "no NameServer answered")

    def invalidate_route(self, topic: str) -> None:
        """Forgets the cached route, so the next use asks a NameServer."""
        with self._lock:
            self._routes.pop(topic, None)

    def leader(self, topic: str, broker_group: str) -> str:
        """Where writes for ``broker_group`` go: a leader learned from a redirect (or
        set with set_leader) beats the route's; "" when nobody knows."""
        with self._lock:
            known = self._leaders.get(broker_group)
        if known:
            return known
        g = self.route(topic).group(broker_group)
        return g.leader if g else ""

    def set_leader(self, broker_group: str, endpoint: str) -> None:
        """Overrides the route: treat ``endpoint`` as ``broker_group``'s leader.

        Redirects use this; so can a caller that knows better than the NameServer,
        or a test that wants a send to start at a follower. A redirect or a failed
        call replaces or clears it."""
        with self._lock:
            self._leaders[broker_group] = endpoint

    def forget_leader(self, broker_group: str, endpoint: Optional[str] = None) -> None:
        """Drops the leader hint (only if it is still ``endpoint``, when given)."""
        with self._lock:
            if endpoint is None or self._leaders.get(broker_group) == endpoint:
                self._leaders.pop(broker_group, None)

    def call_leader(
        self,
        topic: str,
        broker_group: Union[str, Callable[[TopicRoute], str]],
        invoke: Callable[[str, float], T],
        *,
        deadline: float,
        rpc_timeout: Optional[float] = None,
    ) -> tuple[T, str, str]:
        """Runs ``invoke(endpoint, timeout)`` against the group's leader with the
        redirect and retry policy of the module docs; returns (result, broker group,
        endpoint). ``broker_group`` may be a chooser called with the route (again
        only if the chosen group leaves the route)."""
        end = time.monotonic() + deadline
        per_call = self.rpc_timeout if rpc_timeout is None else rpc_timeout
        chooser = broker_group if callable(broker_group) else None
        group = None if chooser else broker_group
        attempt = redirects = 0
        refresh = False
        last: Optional[RaftmqError] = None

        def pause_or_raise(err: RaftmqError) -> None:
            nonlocal attempt, refresh
            attempt += 1
            refresh = True
            pause = backoff(attempt)
            if time.monotonic() + pause >= end:
                raise err
            time.sleep(pause)

        while True:
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise last or RaftmqError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer for {topic!r} within {deadline} s")
            try:
                route = self.route(topic, refresh=refresh)
            except RaftmqError as e:
                if not (e.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED)):
                    raise
                last = e
                pause_or_raise(e)
                continue
            refresh = False
            if chooser is not None and (group is None or route.group(group) is None):
                group = chooser(route)
            assert group is not None
            g = route.group(group)
            if g is None:
                last = RaftmqError(grpc.StatusCode.NOT_FOUND, f"broker group {group!r} does not serve topic {topic!r}")
                pause_or_raise(last)
                continue
            with self._lock:
                endpoint = self._leaders.get(group) or g.leader
            if not endpoint:
                last = RaftmqError(grpc.StatusCode.UNAVAILABLE, f"broker group {group!r} has no known leader")
                pause_or_raise(last)
                continue
            try:
                return invoke(endpoint, min(per_call, max(remaining, 0.001))), group, endpoint
            except grpc.RpcError as e:
                err = error_from_rpc(e, endpoint)
            last = err
            if err.not_leader and err.leader and redirects < MAX_REDIRECTS:
                # A follower named the leader: go there now, no route refresh.
                redirects += 1
                self.set_leader(group, err.leader)
                continue
            if err.transient or err.not_leader:
                self.forget_leader(group, endpoint)
                pause_or_raise(err)
                continue
            raise err

    # -- producing and pulling ----------------------------------------------

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
    ) -> PullResult:
        """Reads one queue from ``offset`` (clamped to the queue's minimum).

        ``max_wait_ms`` > 0 long-polls: the broker answers when a matching message
        arrives or the wait ends. Reads go to the leader, whose applied state is the
        freshest (any replica would answer)."""
        req = pb.PullRequest(
            topic=topic,
            queue_id=queue_id,
            offset=offset,
            max_messages=max_messages,
            max_wait_ms=max_wait_ms,
            tag_expression=tag_expression,
        )
        wait = max_wait_ms / 1000
        resp, group, _ = self.call_leader(
            topic,
            broker_group,
            lambda ep, timeout: self.messaging(ep).Pull(req, timeout=timeout),
            deadline=self.rpc_timeout + wait,
            rpc_timeout=self.rpc_timeout + wait,
        )
        return PullResult(
            [ReceivedMessage.from_pb(m, group) for m in resp.messages],
            resp.next_offset,
            resp.min_offset,
            resp.max_offset,
        )

    def query_offset(self, consumer_group: str, topic: str, broker_group: str, queue_id: int) -> QueueOffset:
        """The group's committed offset in one queue (any replica answers; asks the leader)."""
        req = pb.QueryOffsetRequest(consumer_group=consumer_group, topic=topic, queue_id=queue_id)
        resp, _, _ = self.call_leader(
            topic,
            broker_group,
            lambda ep, timeout: self.consumer_service(ep).QueryOffset(req, timeout=timeout),
            deadline=self.rpc_timeout,
        )
        return QueueOffset(resp.offset if resp.HasField("offset") else None, resp.min_offset, resp.max_offset)


class Producer:
    """Sends messages to broker group leaders (round-robin over writable groups).

    Thread-safe. A send is retried only when it surely did not happen (a follower
    refused it, or the node was unavailable); a call that timed out is raised, not
    retried, since it may have been stored."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._next = random.randrange(1 << 16)

    def _choose(self, queue_id: Optional[int]) -> Callable[[TopicRoute], str]:
        def choose(route: TopicRoute) -> str:
            groups = [g for g in route.groups if g.writable]
            if queue_id is not None:
                # A fixed queue (per-key order) must always land in the same group:
                # the first, by name, that has that queue.
                fits = [g for g in groups if g.queues == 0 or queue_id < g.queues]
                if not fits:
                    raise RaftmqError(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"no writable broker group of topic {route.topic!r} has queue {queue_id}",
                    )
                return fits[0].name
            if not groups:
                raise RaftmqError(grpc.StatusCode.FAILED_PRECONDITION, f"no broker group can write topic {route.topic!r}")
            with self._lock:
                self._next += 1
                return groups[self._next % len(groups)].name

        return choose

    def send(
        self,
        topic: str,
        body: bytes,
        tag: str = "",
        keys: Iterable[str] = (),
        properties: Optional[Mapping[str, str]] = None,
        queue_id: Optional[int] = None,
        *,
        broker_group: Optional[str] = None,
        deadline: Optional[float] = None,
    ) -> SendResult:
        """Stores one message and returns where it went.

        ``queue_id`` pins the queue (e.g. a sharding key's hash, for per-key order);
        unset, the broker picks one. ``broker_group`` pins the group (default:
        round-robin). ``deadline`` (seconds, default the client's send_deadline)
        bounds redirects, route refreshes and backoff. Raises RaftmqError."""
        if isinstance(body, str):
            raise TypeError("body must be bytes (encode the string first)")
        msg = pb.Message(
            topic=topic,
            tag=tag,
            keys=list(keys),
            properties=dict(properties or {}),
            body=bytes(body),
            born_timestamp_ms=int(time.time() * 1000),
        )
        req = pb.SendRequest(topic=topic, messages=[msg])
        if queue_id is not None:
            req.queue_id = queue_id
        resp, group, endpoint = self.client.call_leader(
            topic,
            broker_group if broker_group is not None else self._choose(queue_id),
            lambda ep, timeout: self.client.messaging(ep).Send(req, timeout=timeout),
            deadline=self.client.send_deadline if deadline is None else deadline,
        )
        if len(resp.results) != 1:
            raise RaftmqError(
                grpc.StatusCode.INTERNAL, f"one message sent, {len(resp.results)} results returned", endpoint=endpoint
            )
        # A provisional route was never cached; the next send asks again and finds
        # the topic once the broker's registration reaches the NameServer.
        r = resp.results[0]
        return SendResult(r.message_id, group, r.queue_id, r.queue_offset)

"""Connections, routes, sends and pulls.

Everything here follows proto/raftmq/v1/messaging.proto, the whole wire contract:

* Routes come from NameServerService.QueryRoute, cached per topic (they change on
  failover and topic creation, not per request) and fetched again after an error.
* Writes must reach a broker group's leader. A follower answers FAILED_PRECONDITION
  with metadata ``raftmq-leader`` naming the leader, so the client redirects at once
  instead of waiting for the NameServer to learn of an election.
* An endpoint that fails without answering (UNAVAILABLE: reset, refused, or a node
  that cannot serve; or no answer within ``rpc_timeout``, which is how a paused or
  cut-off leader shows) is remembered as dead for ``DEAD_FOR`` seconds by every
  call of the Client. Instead of retrying it, the group's other replicas are asked
  who leads, the first at once, then with a short backoff; they name the new
  leader as soon as they have elected one. A replica still naming the dead
  endpoint has not noticed yet: the call waits briefly and asks again rather than
  redialling it. Calls a follower would serve itself (pulls, offset queries) ask
  followers with AdminService.ClusterStatus, which every replica answers.
* A not-leader answer that names no leader (mid-election) is transient too. When
  a round of answers named no usable leader, the route is fetched again. Every
  call is bounded by a deadline. Anything else is the caller's problem and raised
  as RaftmqError at once.

This is the policy of the Rust client's ``leader`` module (client/src/leader.rs);
``Chase`` below is its decision logic, kept free of I/O.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence, TypeVar, Union

import grpc

from ._pb import pb, pb_grpc
from .auth import Signer

T = TypeVar("T")

#: Metadata key of a not-leader answer: the leader's endpoint, empty while unknown.
LEADER_METADATA_KEY = "raftmq-leader"

#: Redirects followed back to back without a pause: two stale nodes naming each
#: other must not spin.
MAX_HOPS = 3

#: Seconds an endpoint that failed stays skipped: longer than an election (the
#: brokers' default election timeout is 0.2-0.4 s, plus a vote round), so its
#: replicas have moved on when it is tried again; short enough that a leader that
#: was merely slow once gets traffic back within a second.
DEAD_FOR = 1.0

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


def backoff(pauses: int) -> float:
    """Pause after ``pauses`` earlier pauses (0, 1, ...): 10 ms doubling to 50 ms.

    An election takes a few hundred ms and each answer meanwhile costs about one,
    so long pauses would only add their own length to the failover a caller sees.
    """
    return min(0.01 * (2 ** min(pauses, 3)), 0.05)


# What a failed attempt says about where the leader is (see Chase.observe).
REDIRECT, LEADERLESS, UNREACHABLE = "redirect", "leaderless", "unreachable"


class Chase:
    """One call's pursuit of a broker group's leader: which endpoint to try next and
    how long to pause, given the answers so far. No I/O; ``dead(endpoint)`` says
    whether the Client's dead set holds an endpoint now.

    Mirrors ``Chase`` in client/src/leader.rs."""

    def __init__(self) -> None:
        self.redirect: Optional[str] = None  # a leader a replica named, tried first
        self.hops = 0  # redirects followed back to back
        self.asked = 0  # rotation over the followers asked
        self.pauses = 0  # the backoff's exponent
        self.prompt_spent = False  # the one immediate follower query after a failure
        self.fruitless = 0  # answers since the last refresh that named no usable leader

    def next(self, leader: str, followers: Sequence[str], dead: Callable[[str], bool]) -> Optional[tuple[str, bool]]:
        """(endpoint, believed leader) to dial, or None when every replica is dead."""
        if self.redirect is not None:
            if not dead(self.redirect):
                return self.redirect, True
            self.redirect = None
        if leader and not dead(leader):
            return leader, True
        alive = [f for f in followers if f and f != leader and not dead(f)]
        if not alive:
            return None
        pick = alive[self.asked % len(alive)]
        self.asked += 1
        return pick, False

    def stuck(self) -> tuple[float, bool]:
        """Nobody to dial: (pause, refresh the route)."""
        self.fruitless = 0
        return self._pause(), True

    def observe(
        self, endpoint: str, kind: str, named: str, replicas: int, dead: Callable[[str], bool]
    ) -> tuple[float, bool]:
        """Digests a failed attempt on ``endpoint``; ``named`` is the leader a redirect
        named. The caller marks an unreachable endpoint dead first. Returns (pause,
        refresh the route)."""
        if kind == REDIRECT and not dead(named):
            self.redirect = named
            self.hops += 1
            if self.hops <= MAX_HOPS:
                pause = 0.0
            else:
                self.hops = 0
                pause = self._pause()
        elif kind in (REDIRECT, LEADERLESS):
            # A redirect to a dead endpoint: that replica has not noticed the death.
            self.hops = 0
            self.fruitless += 1
            pause = self._pause()
        else:
            self.hops = 0
            self.fruitless += 1
            if self.redirect == endpoint:
                self.redirect = None
            if self.prompt_spent:
                pause = self._pause()
            else:
                # Its replicas may know the new leader already: ask one now.
                self.prompt_spent = True
                pause = 0.0
        refresh = self.fruitless >= replicas
        if refresh:
            self.fruitless = 0
        return pause, refresh

    def _pause(self) -> float:
        p = backoff(self.pauses)
        self.pauses += 1
        return p


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
    queue_offset: int  # 0 for a delayed message: its offset is assigned at delivery
    deliver_at_ms: int = 0  # a delayed message: when it becomes visible (ms since the epoch)


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """A stored message as a pull or a consumer returns it.

    ``reconsume_times``: how often the consumer group already failed it (0 on a
    first delivery; read from ``%RETRY%<group>`` or ``%DLQ%<group>``, where
    ``topic`` is the original topic). ``deliver_at_ms``: when a delayed message
    was due (0 for an immediate one)."""

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
    reconsume_times: int = 0
    deliver_at_ms: int = 0

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
            reconsume_times=m.reconsume_times,
            deliver_at_ms=msg.deliver_at_ms,
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

    ``rpc_timeout``: longest wait for one request's answer (seconds; a pull adds its
    long-poll wait). Past it the endpoint counts as dead for a moment and its
    replicas are asked who leads: it is how a paused or cut-off leader, which resets
    nothing, is noticed. Default 1 s: a healthy answer takes milliseconds, and the
    brokers' elections (0.2-0.4 s timeout) are over by then. ``send_deadline``: total
    time a send (or heartbeat, pull, offset query) may spend on redirects, route
    refreshes and backoff; at least ``rpc_timeout``. ``route_ttl``: how long a cached
    route is trusted before it is asked for again. ``tls_ca_file``: a PEM file of the
    CA(s) the cluster's certificates are checked against; given, every connection
    (NameServers and brokers) is TLS, and a NameServer may be written
    ``https://host:port``. Default: plaintext. ``access_key`` and ``secret``: sign
    every call (see ``raftmq.auth``), as brokers with ``[auth] enabled`` require;
    ``secret_file`` may hold the secret instead. Default: unsigned.
    """

    def __init__(
        self,
        nameservers: Union[Sequence[str], str],
        *,
        rpc_timeout: float = 1.0,
        send_deadline: float = 10.0,
        route_ttl: float = 30.0,
        tls_ca_file: Optional[str] = None,
        access_key: Optional[str] = None,
        secret: Optional[str] = None,
        secret_file: Optional[str] = None,
    ) -> None:
        if secret_file is not None:
            if secret is not None:
                raise ValueError("give secret or secret_file, not both")
            try:
                with open(secret_file, encoding="utf-8") as f:
                    secret = f.read().strip()
            except OSError as e:
                raise ValueError(f"secret_file {secret_file!r} cannot be read: {e}") from e
        if (access_key is None) != (secret is None):
            raise ValueError("access_key and secret (or secret_file) go together")
        self._signer: Optional[Signer] = Signer(access_key, secret) if access_key is not None and secret is not None else None
        if isinstance(nameservers, str):
            nameservers = [a for a in nameservers.replace(";", ",").split(",") if a.strip()]
        self._credentials: Optional[grpc.ChannelCredentials] = None
        if tls_ca_file is not None:
            try:
                with open(tls_ca_file, "rb") as f:
                    ca = f.read()
            except OSError as e:
                raise ValueError(f"tls_ca_file {tls_ca_file!r} cannot be read: {e}") from e
            if b"-----BEGIN CERTIFICATE-----" not in ca:
                raise ValueError(f"tls_ca_file {tls_ca_file!r} holds no PEM certificate")
            self._credentials = grpc.ssl_channel_credentials(root_certificates=ca)
        self.nameservers = [self._bare(a.strip()) for a in nameservers]
        if not self.nameservers:
            raise ValueError("at least one NameServer address (host:port) is needed")
        if not rpc_timeout > 0:
            raise ValueError(f"rpc_timeout must be above zero, not {rpc_timeout!r}")
        if not send_deadline >= rpc_timeout:
            raise ValueError(
                f"send_deadline ({send_deadline!r}) must be at least rpc_timeout ({rpc_timeout!r}),"
                " which would otherwise never get a whole request in"
            )
        self.rpc_timeout = rpc_timeout
        self.send_deadline = send_deadline
        self.route_ttl = route_ttl
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._routes: dict[str, TopicRoute] = {}
        # Broker group -> leader endpoint learned from a redirect (or set by
        # set_leader); it beats the route's leader until a call to it fails.
        self._leaders: dict[str, str] = {}
        # Endpoint -> monotonic time until which it counts as dead (see DEAD_FOR).
        self._dead: dict[str, float] = {}
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

    def _bare(self, endpoint: str) -> str:
        """``endpoint`` without a scheme, refusing one that contradicts the TLS setting."""
        if endpoint.startswith("https://"):
            if self._credentials is None:
                raise ValueError(f"{endpoint} asks for TLS: give tls_ca_file, the CA to check the server against")
            return endpoint[len("https://") :]
        if endpoint.startswith("http://"):
            if self._credentials is not None:
                raise ValueError(f"{endpoint} asks for plaintext while TLS is on (drop the http:// prefix)")
            return endpoint[len("http://") :]
        return endpoint

    def make_channel(self, endpoint: str, options: Sequence[tuple[str, Any]]) -> grpc.Channel:
        """A new channel to ``endpoint``: TLS when the client has a CA, else plaintext."""
        if self._credentials is not None:
            channel = grpc.secure_channel(endpoint, self._credentials, options=list(options))
        else:
            channel = grpc.insecure_channel(endpoint, options=list(options))
        if self._signer is not None:
            channel = grpc.intercept_channel(channel, self._signer)
        return channel

    def channel(self, endpoint: str) -> grpc.Channel:
        """The one channel to ``endpoint`` (host:port), created on first use."""
        with self._lock:
            if self._closed:
                raise RuntimeError("raftmq Client is closed")
            ch = self._channels.get(endpoint)
            if ch is None:
                ch = self.make_channel(
                    endpoint,
                    [
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

    def endpoint_failed(self, endpoint: str) -> None:
        """Counts ``endpoint`` as dead for DEAD_FOR seconds: calls skip it and ask its
        replicas who leads instead."""
        with self._lock:
            self._dead[endpoint] = time.monotonic() + DEAD_FOR

    def is_dead(self, endpoint: str) -> bool:
        """Whether ``endpoint`` failed within the last DEAD_FOR seconds."""
        with self._lock:
            until = self._dead.get(endpoint)
            if until is None:
                return False
            if until > time.monotonic():
                return True
            del self._dead[endpoint]
            return False

    def _answered(self, endpoint: str) -> None:
        # Whatever it said, it is alive.
        with self._lock:
            self._dead.pop(endpoint, None)

    def _who_leads(self, endpoint: str, broker_group: str, timeout: float) -> RaftmqError:
        """Asks a replica who leads its group, as the not-leader error a write would
        have got (so one classification serves both); a failure of the question
        counts as the replica being unavailable."""
        try:
            resp = pb_grpc.AdminServiceStub(self.channel(endpoint)).ClusterStatus(
                pb.ClusterStatusRequest(), timeout=timeout
            )
        except grpc.RpcError as e:
            err = error_from_rpc(e, endpoint)
            if err.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return err
            return RaftmqError(grpc.StatusCode.UNAVAILABLE, f"cannot ask it who leads: {err}", endpoint=endpoint)
        leader = next((g.leader_endpoint for g in resp.groups if g.broker_group == broker_group), "")
        return RaftmqError(grpc.StatusCode.FAILED_PRECONDITION, "not leader", endpoint=endpoint, leader=leader)

    def find_leader(self, topic: str, broker_group: str, *, deadline: Optional[float] = None) -> str:
        """The endpoint of ``broker_group``'s leader as best known without asking it:
        a leader hint or the route's leader unless dead, else what its replicas say.
        Raises RaftmqError when none is found within ``deadline`` (default rpc_timeout)."""
        endpoint, _, _ = self.call_leader(
            topic,
            broker_group,
            lambda ep, _timeout: ep,
            deadline=self.rpc_timeout if deadline is None else deadline,
            ask_followers=True,
        )
        return endpoint

    def call_leader(
        self,
        topic: str,
        broker_group: Union[str, Callable[[TopicRoute], str]],
        invoke: Callable[[str, float], T],
        *,
        deadline: float,
        rpc_timeout: Optional[float] = None,
        ask_followers: bool = False,
        retry_timeouts: bool = True,
    ) -> tuple[T, str, str]:
        """Runs ``invoke(endpoint, timeout)`` against the group's leader with the
        policy of the module docs; returns (result, broker group, endpoint).

        ``broker_group`` may be a chooser called with the route (again only if the
        chosen group leaves the route). ``ask_followers``: followers would serve the
        call themselves (reads), so they are only asked who leads; otherwise a
        follower is asked by making the call, which it refuses naming the leader.
        ``retry_timeouts`` False: a call without an answer within its timeout is
        raised (its outcome is unknown, e.g. a send that may have been stored); the
        endpoint is still counted as dead for the next call."""
        started = time.monotonic()
        end = started + deadline
        per_call = self.rpc_timeout if rpc_timeout is None else rpc_timeout
        chooser = broker_group if callable(broker_group) else None
        group = None if chooser else broker_group
        chase = Chase()
        refresh = False
        last: Optional[RaftmqError] = None

        def give_up(pause: float) -> bool:
            return time.monotonic() + pause >= end

        while True:
            pause = 0.0
            try:
                route = self.route(topic, refresh=refresh)
                refresh = False
                if chooser is not None and (group is None or route.group(group) is None):
                    group = chooser(route)
                assert group is not None
                g = route.group(group)
                if g is None:
                    raise RaftmqError(grpc.StatusCode.NOT_FOUND, f"broker group {group!r} does not serve topic {topic!r}")
            except RaftmqError as e:
                if e.code not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.DEADLINE_EXCEEDED):
                    raise
                last = e
                pause, refresh = chase.stuck()
                if give_up(pause):
                    raise e
                time.sleep(pause)
                continue
            with self._lock:
                hint = self._leaders.get(group, "")
            leader = hint or g.leader
            followers = [f for f in (g.leader, *g.followers) if f and f != leader]
            dial = chase.next(leader, followers, self.is_dead)
            if dial is None:
                last = RaftmqError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"every replica of broker group {group!r} failed within the last {DEAD_FOR} s",
                )
                pause, refresh = chase.stuck()
                if give_up(pause):
                    raise last
                time.sleep(pause)
                continue
            endpoint, believed_leader = dial
            remaining = end - time.monotonic()
            if remaining <= 0:
                raise last or RaftmqError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer for {topic!r} within {deadline} s")
            timeout = min(per_call, remaining)
            if believed_leader or not ask_followers:
                try:
                    result = invoke(endpoint, timeout)
                except grpc.RpcError as e:
                    err = error_from_rpc(e, endpoint)
                else:
                    self._answered(endpoint)
                    if endpoint == g.leader:
                        self.forget_leader(group)  # the route is right: drop a stale hint
                    else:
                        self.set_leader(group, endpoint)
                    return result, group, endpoint
            else:
                err = self._who_leads(endpoint, group, min(self.rpc_timeout, remaining))
            last = err
            timed_out = err.code == grpc.StatusCode.DEADLINE_EXCEEDED
            if err.not_leader and err.leader:
                kind = REDIRECT
                self._answered(endpoint)
                if not self.is_dead(err.leader):
                    self.set_leader(group, err.leader)
            elif err.not_leader:
                kind = LEADERLESS
                self._answered(endpoint)
            elif err.code == grpc.StatusCode.UNAVAILABLE or timed_out:
                kind = UNREACHABLE
                # A request the deadline cut short proves nothing by timing out.
                if not (timed_out and timeout < per_call):
                    self.endpoint_failed(endpoint)
                self.forget_leader(group, endpoint)
                if timed_out and not retry_timeouts:
                    raise err
            else:
                raise err
            pause, refresh = chase.observe(endpoint, kind, err.leader or "", 1 + len(followers), self.is_dead)
            if give_up(pause):
                raise err
            if pause:
                time.sleep(pause)

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
            deadline=self.send_deadline + wait,
            rpc_timeout=self.rpc_timeout + wait,
            ask_followers=True,
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
            deadline=self.send_deadline,
            ask_followers=True,
        )
        return QueueOffset(resp.offset if resp.HasField("offset") else None, resp.min_offset, resp.max_offset)


class Producer:
    """Sends messages to broker group leaders (round-robin over writable groups).

    Thread-safe. Idempotent by default: each send carries this producer's id and
    a sequence number, so a send that timed out is retried and the broker group
    answers a retry of a stored send from its first attempt (same message id and
    offset) instead of storing it twice, across failovers too. With
    ``idempotent=False`` a send is retried only when it surely did not happen (a
    follower refused it, or the node was unavailable); a call that timed out is
    raised, since it may have been stored."""

    def __init__(self, client: Client, *, idempotent: bool = True) -> None:
        self.client = client
        self._lock = threading.Lock()
        self._next = random.randrange(1 << 16)
        self.producer_id = uuid.uuid4().hex if idempotent else ""
        self._sequence = 0

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
        deliver_at_ms: int = 0,
        delay_ms: int = 0,
        delay_level: int = 0,
    ) -> SendResult:
        """Stores one message and returns where it went.

        ``queue_id`` pins the queue (e.g. a sharding key's hash, for per-key order);
        unset, the broker picks one. ``broker_group`` pins the group (default:
        round-robin). ``deadline`` (seconds, default the client's send_deadline)
        bounds redirects, route refreshes and backoff. Raises RaftmqError.

        Delayed delivery (set at most one): ``deliver_at_ms``, an absolute time in
        ms since the epoch; ``delay_ms``, relative to the broker's receipt;
        ``delay_level``, RocketMQ's levels 1..18 (1s 5s 10s 30s 1m 2m 3m ... 2h).
        The message is stored at once and becomes visible to every consumer at its
        time, never before (at most the broker's ``max_delay_ms`` ahead, default 3
        days; a past time delivers at once). The result's ``deliver_at_ms`` says
        when, and its ``queue_offset`` is 0 (assigned at delivery)."""
        if isinstance(body, str):
            raise TypeError("body must be bytes (encode the string first)")
        delays = {"deliver_at_ms": deliver_at_ms, "delay_ms": delay_ms, "delay_level": delay_level}
        for name, value in delays.items():
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, not {value!r}")
        if sum(1 for v in delays.values() if v) > 1:
            raise ValueError(f"set at most one of deliver_at_ms, delay_ms and delay_level, not {delays}")
        msg = pb.Message(
            topic=topic,
            tag=tag,
            keys=list(keys),
            properties=dict(properties or {}),
            body=bytes(body),
            born_timestamp_ms=int(time.time() * 1000),
            deliver_at_ms=deliver_at_ms,
            delay_ms=delay_ms,
            delay_level=delay_level,
        )
        r, group, _ = self._send_one(topic, msg, queue_id, broker_group, deadline)
        return SendResult(r.message_id, group, r.queue_id, r.queue_offset, r.deliver_at_ms)

    def _send_one(
        self,
        topic: str,
        msg: "pb.Message",
        queue_id: Optional[int],
        broker_group: Optional[str],
        deadline: Optional[float],
        *,
        producer_group: str = "",
    ) -> tuple["pb.SendResult", str, str]:
        """Sends one built message to the chosen group's leader; returns (its
        result, broker group, endpoint). ``producer_group`` makes it a
        transactional (half) message of that producer group."""
        req = pb.SendRequest(topic=topic, messages=[msg])
        if queue_id is not None:
            req.queue_id = queue_id
        if producer_group:
            req.transactional, req.producer_group = True, producer_group
        if self.producer_id:
            with self._lock:
                self._sequence += 1
                req.producer_id, req.sequence = self.producer_id, self._sequence
        resp, group, endpoint = self.client.call_leader(
            topic,
            broker_group if broker_group is not None else self._choose(queue_id),
            lambda ep, timeout: self.client.messaging(ep).Send(req, timeout=timeout),
            deadline=self.client.send_deadline if deadline is None else deadline,
            # Unanswered within rpc_timeout, it may have been stored: only an
            # idempotent send (answered from its first attempt) is resent.
            retry_timeouts=bool(self.producer_id),
        )
        if len(resp.results) != 1:
            raise RaftmqError(
                grpc.StatusCode.INTERNAL, f"one message sent, {len(resp.results)} results returned", endpoint=endpoint
            )
        # A provisional route was never cached; the next send asks again and finds
        # the topic once the broker's registration reaches the NameServer.
        return resp.results[0], group, endpoint

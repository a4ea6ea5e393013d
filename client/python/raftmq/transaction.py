"""Transactional messages (RocketMQ's half messages): SendRequest.transactional,
MessagingService.EndTransaction and MessagingService.TransactionChecks in proto/.

    def local_transaction(half: raftmq.HalfMessage) -> raftmq.TransactionResolution:
        db.insert_order(half.transaction_id)          # the application's own transaction
        return raftmq.TransactionResolution.COMMIT

    def checker(check: raftmq.TransactionCheck) -> raftmq.TransactionResolution:
        done = db.order_exists(check.transaction_id)  # asked by the broker when unsure
        return raftmq.TransactionResolution.COMMIT if done else raftmq.TransactionResolution.UNKNOWN

    with raftmq.TransactionProducer(client, "order-producers", checker) as producer:
        r = producer.send("Orders", b"order 7", local_transaction, keys=["order-7"])

The protocol, and how this class keeps it:

* ``begin`` sends a half message: a SendRequest with ``transactional`` and the
  producer group, exactly one message, never delayed, to the topic's broker group
  leader with the Producer's policy (redirects, dead endpoints, idempotent
  ``producer_id`` + ``sequence``, so a retried half message is stored once). The
  broker stores it through Raft but no consumer sees it. Its result's
  ``transaction_id`` (the message id) and broker group make the HalfMessage.
* ``commit`` / ``rollback`` send EndTransaction (source CLIENT) to the leader of
  the broker group that stored it, following redirects like a send. Ending it
  again the same way is answered ``already_ended``, so a timed-out end is
  retried; the opposite way is FAILED_PRECONDITION (raised).
* ``send`` is begin, then ``local_transaction(half)``, then commit or rollback as
  it answered. UNKNOWN (or an exception, logged) ends nothing: the broker asks.
* Check-back: for every topic this producer sends half messages to (from
  before the first send), and those of ``topics`` / ``add_topic``, a
  TransactionChecks stream is kept open to every replica of every broker group
  serving it (only the leader checks, and any replica may become leader).
  Routes are asked again every ``route_refresh_s`` seconds, so replicas that
  join or leave get streams opened or closed; a stream that fails or ends is
  reopened after ``reopen_backoff_s``. Each check is handed to ``checker`` on a
  small thread pool (never on a stream's thread), at most once at a time per
  transaction; COMMIT or ROLLBACK is sent with EndTransaction
  (source SERVER_CHECK) to the broker group's leader, UNKNOWN sends nothing (the
  broker asks again later, and rolls back after its maximum checks). A checker
  that raises is logged and counts as UNKNOWN.

Thread-safe. Logs to the ``raftmq.transaction`` logger.
"""

from __future__ import annotations

import concurrent.futures
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import grpc

from ._pb import pb, pb_grpc
from .client import Client, Producer, RaftmqError, ReceivedMessage, error_from_rpc
from .consumer import _default_client_id

log = logging.getLogger("raftmq.transaction")


class TransactionResolution(enum.IntEnum):
    """A transaction's outcome as the producer sees it; the values are the wire's
    (``pb.TRANSACTION_RESOLUTION_*``)."""

    #: Not known yet: nothing is ended, the broker checks back later.
    UNKNOWN = 0
    COMMIT = 1
    ROLLBACK = 2


def _resolution(value: object, what: str) -> TransactionResolution:
    """What a local transaction or checker returned, as a TransactionResolution
    (None counts as UNKNOWN). Anything else is logged and counts as UNKNOWN."""
    if isinstance(value, TransactionResolution):
        return value
    if value is None:
        return TransactionResolution.UNKNOWN
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return TransactionResolution(value)
        except ValueError:
            pass
    log.error("%s returned %r, not a raftmq.TransactionResolution: treated as UNKNOWN", what, value)
    return TransactionResolution.UNKNOWN


@dataclass(frozen=True, slots=True)
class HalfMessage:
    """A stored, not yet visible transactional message: what ending it needs.

    Built by ``begin``; an application that ends transactions elsewhere may keep
    these four strings and build one again (``queue_id`` is informative)."""

    topic: str
    transaction_id: str
    broker_group: str
    message_id: str = ""
    queue_id: int = 0


@dataclass(frozen=True, slots=True)
class EndTransactionResult:
    """An EndTransaction's answer. ``already_ended``: it had been ended this way
    before (a retry); nothing changed. A commit's ``queue_id`` and
    ``queue_offset`` say where the message became visible (0 for a rollback)."""

    transaction_id: str
    resolution: TransactionResolution
    already_ended: bool
    queue_id: int
    queue_offset: int


@dataclass(frozen=True, slots=True)
class TransactionSendResult:
    """What ``TransactionProducer.send`` did.

    ``receipt``: the half message. ``resolution``: the local transaction's answer
    (UNKNOWN when it raised: ``local_error``). ``end``: the EndTransaction answer
    when COMMIT or ROLLBACK was sent and acknowledged; ``end_error``: why it was
    not (the broker then checks back and the checker decides)."""

    receipt: HalfMessage
    resolution: TransactionResolution
    end: Optional[EndTransactionResult] = None
    local_error: Optional[BaseException] = None
    end_error: Optional[RaftmqError] = None

    @property
    def message_id(self) -> str:
        return self.receipt.message_id

    @property
    def transaction_id(self) -> str:
        return self.receipt.transaction_id

    @property
    def broker_group(self) -> str:
        return self.receipt.broker_group

    @property
    def queue_id(self) -> int:
        """The committed message's queue (else the half message's)."""
        if self.end is not None and self.end.resolution == TransactionResolution.COMMIT:
            return self.end.queue_id
        return self.receipt.queue_id

    @property
    def queue_offset(self) -> int:
        """The committed message's offset; 0 unless committed."""
        if self.end is not None and self.end.resolution == TransactionResolution.COMMIT:
            return self.end.queue_offset
        return 0

    @property
    def ended(self) -> bool:
        """COMMIT or ROLLBACK reached the broker group."""
        return self.end is not None


@dataclass(frozen=True, slots=True)
class TransactionCheck:
    """A broker's question about a transaction whose outcome it has not got.

    ``message``: the half message as stored (``queue_offset`` 0). ``check_times``:
    1 on the first check. ``endpoint``: the replica (the leader) that asked."""

    broker_group: str
    transaction_id: str
    message: ReceivedMessage
    check_times: int
    endpoint: str = ""


Checker = Callable[[TransactionCheck], TransactionResolution]
LocalTransaction = Callable[[HalfMessage], TransactionResolution]

#: Check streams carry no traffic for long stretches: HTTP/2 pings while one is
#: open notice a replica that vanished without a reset, so the stream is reopened.
_STREAM_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 << 20),
    ("grpc.max_send_message_length", 64 << 20),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 0),
    ("grpc.http2.max_pings_without_data", 0),
]


class _CheckStream:
    """One TransactionChecks stream to one replica, on a thread of its own that
    reopens it after ``backoff`` whenever it fails or ends, until stopped."""

    def __init__(self, owner: "TransactionProducer", endpoint: str) -> None:
        self.owner = owner
        self.endpoint = endpoint
        self.connected = False
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._call: Optional[grpc.Call] = None
        self._channel: Optional[grpc.Channel] = None
        self.thread = threading.Thread(
            target=self._run, name=f"raftmq-tx-checks-{endpoint}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            call = self._call
        if call is not None:
            call.cancel()

    def _run(self) -> None:
        owner = self.owner
        req = pb.TransactionChecksRequest(producer_group=owner.producer_group, client_id=owner.client_id)
        last_problem = ""
        try:
            while not self._stop.is_set():
                problem = ""
                try:
                    if self._channel is None:
                        self._channel = owner.client.make_channel(self.endpoint, _STREAM_CHANNEL_OPTIONS)
                    call = pb_grpc.MessagingServiceStub(self._channel).TransactionChecks(req)
                    with self._lock:
                        self._call = call
                    if self._stop.is_set():  # stop() ran before the call was visible to it
                        call.cancel()
                        break
                    # Headers arrive when the replica has registered the stream;
                    # an error ends the call instead (is_active then is False).
                    call.initial_metadata()
                    if call.is_active():
                        self.connected = True
                        if last_problem:
                            log.info("transaction checks from %s: stream open again", self.endpoint)
                            last_problem = ""
                        else:
                            log.debug("transaction checks from %s: stream open", self.endpoint)
                    for check in call:
                        owner._dispatch(self.endpoint, check)
                    problem = "the replica ended the stream"
                except grpc.RpcError as e:
                    if self._stop.is_set():
                        break
                    err = error_from_rpc(e, self.endpoint)
                    problem = f"{err.code.name}: {err.message}"
                except Exception:  # a bug: keep the stream going, but say so
                    if self._stop.is_set():
                        break
                    log.exception("transaction checks from %s: unexpected error", self.endpoint)
                    problem = "unexpected error"
                finally:
                    self.connected = False
                    with self._lock:
                        self._call = None
                if self._stop.is_set():
                    break
                # Said once per kind of failure: a replica that stays down would
                # otherwise log every backoff.
                if problem != last_problem:
                    log.warning(
                        "transaction checks from %s: %s; reopening every %.1f s",
                        self.endpoint,
                        problem,
                        owner.reopen_backoff_s,
                    )
                    last_problem = problem
                self._stop.wait(owner.reopen_backoff_s)
        finally:
            self.connected = False
            if self._channel is not None:
                self._channel.close()


class TransactionProducer:
    """A transactional producer of ``producer_group`` (see the module docs).

    ``client``: a Client, or NameServer addresses (then this producer makes its
    own Client and closes it on close()). ``checker(check)`` answers the brokers'
    check-backs with a TransactionResolution. ``topics``: listen for checks on
    these topics' broker groups from the start (a restarted producer must answer
    checks about half messages its predecessor sent); topics sent to are added by
    themselves. ``idempotent``: as for Producer. ``client_id``: this producer's
    identity in TransactionChecks (default host@pid@random). ``check_threads``:
    the checkers' pool. ``route_refresh_s``: how often the topics' routes are
    asked again for replicas to open streams to. ``reopen_backoff_s``: pause
    before reopening a failed stream. ``close_timeout_s``: how long close() waits
    for running checkers.
    """

    def __init__(
        self,
        client: Union[Client, Sequence[str], str],
        producer_group: str,
        checker: Checker,
        *,
        topics: Iterable[str] = (),
        idempotent: bool = True,
        client_id: Optional[str] = None,
        check_threads: int = 4,
        route_refresh_s: float = 10.0,
        reopen_backoff_s: float = 1.0,
        close_timeout_s: float = 5.0,
    ) -> None:
        if not producer_group:
            raise ValueError("a transactional producer needs a producer group")
        if not callable(checker):
            raise TypeError(f"checker must be callable, not {checker!r}")
        if check_threads < 1:
            raise ValueError(f"check_threads must be at least 1, not {check_threads!r}")
        if not route_refresh_s > 0 or not reopen_backoff_s > 0:
            raise ValueError("route_refresh_s and reopen_backoff_s must be above zero")
        self._owns_client = not isinstance(client, Client)
        self.client: Client = Client(client) if self._owns_client else client  # type: ignore[arg-type]
        self.producer_group = producer_group
        self.checker = checker
        self.client_id = client_id or _default_client_id()
        self.route_refresh_s = route_refresh_s
        self.reopen_backoff_s = reopen_backoff_s
        self.close_timeout_s = close_timeout_s
        self._producer = Producer(self.client, idempotent=idempotent)
        self._lock = threading.Lock()
        self._closed = False
        #: Topic -> the replica endpoints its last successful route named.
        self._topics: dict[str, frozenset[str]] = {}
        #: Topic -> the broker groups its last successful route named.
        self._topic_groups: dict[str, frozenset[str]] = {}
        self._streams: dict[str, _CheckStream] = {}
        #: (broker group, transaction id) of checks being answered now.
        self._checking: set[tuple[str, str]] = set()
        self._futures: set[concurrent.futures.Future] = set()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=check_threads, thread_name_prefix="raftmq-tx-checker"
        )
        self._wake = threading.Event()
        self._watcher = threading.Thread(target=self._watch_routes, name="raftmq-tx-routes", daemon=True)
        for topic in topics:
            self._topics.setdefault(topic, frozenset())
        self._watcher.start()
        if self._topics:
            self._wake.set()  # open the streams now, from the watcher's thread

    @property
    def producer_id(self) -> str:
        """The idempotent producer id its sends carry ("" when not idempotent)."""
        return self._producer.producer_id

    @property
    def check_streams(self) -> dict[str, bool]:
        """Replica endpoint -> whether its TransactionChecks stream is open now."""
        with self._lock:
            return {ep: s.connected for ep, s in self._streams.items()}

    # -- sending and ending ---------------------------------------------------

    def begin(
        self,
        topic: str,
        body: Union[bytes, "pb.Message"],
        tag: str = "",
        keys: Iterable[str] = (),
        properties: Optional[Mapping[str, str]] = None,
        queue_id: Optional[int] = None,
        *,
        broker_group: Optional[str] = None,
        deadline: Optional[float] = None,
    ) -> HalfMessage:
        """Stores a half message: invisible to consumers until committed.

        ``body`` is bytes, or a whole ``pb.Message`` (then ``tag``, ``keys`` and
        ``properties`` must be left out). ``queue_id``, ``broker_group`` and
        ``deadline`` as for Producer.send; no delays (a half message cannot be
        delayed). Raises RaftmqError; nothing is stored then, or (after a timeout
        of a non-idempotent producer) it may be, and the broker will check back."""
        self._check_open()
        msg = _message(topic, body, tag, keys, properties)
        # Streams first (for a new topic), so a check of this very message can reach us.
        self._learn(topic)
        r, group, _ = self._producer._send_one(
            topic, msg, queue_id, broker_group, deadline, producer_group=self.producer_group
        )
        transaction_id = r.transaction_id or r.message_id
        if not transaction_id:
            raise RaftmqError(grpc.StatusCode.INTERNAL, "a transactional send was answered without a transaction id")
        if not r.transaction_id:
            log.debug("%s: no transaction_id in the SendResult; using the message id", r.message_id)
        return HalfMessage(topic, transaction_id, group, r.message_id, r.queue_id)

    def commit(self, half: HalfMessage, *, deadline: Optional[float] = None) -> EndTransactionResult:
        """Makes the half message visible. Raises RaftmqError: FAILED_PRECONDITION
        if it was rolled back (e.g. by the broker after its maximum checks),
        NOT_FOUND if the broker group does not know the id."""
        return self.end(half, TransactionResolution.COMMIT, deadline=deadline)

    def rollback(self, half: HalfMessage, *, deadline: Optional[float] = None) -> EndTransactionResult:
        """Discards the half message. Raises RaftmqError: FAILED_PRECONDITION if it
        was committed, NOT_FOUND if the broker group does not know the id."""
        return self.end(half, TransactionResolution.ROLLBACK, deadline=deadline)

    def end(
        self, half: HalfMessage, resolution: TransactionResolution, *, deadline: Optional[float] = None
    ) -> EndTransactionResult:
        """EndTransaction (source CLIENT) at the leader of ``half.broker_group``.
        UNKNOWN is sent too (the broker changes nothing)."""
        self._check_open()
        return self._end(
            half.topic, half.broker_group, half.transaction_id, resolution, pb.TRANSACTION_SOURCE_CLIENT, deadline
        )

    def send(
        self,
        topic: str,
        body: Union[bytes, "pb.Message"],
        local_transaction: LocalTransaction,
        tag: str = "",
        keys: Iterable[str] = (),
        properties: Optional[Mapping[str, str]] = None,
        queue_id: Optional[int] = None,
        *,
        broker_group: Optional[str] = None,
        deadline: Optional[float] = None,
    ) -> TransactionSendResult:
        """Sends a half message, runs ``local_transaction(half)``, and commits or
        rolls back as it answers (UNKNOWN: leaves it to the checker).

        A local transaction that raises is logged and counts as UNKNOWN (the
        exception is ``local_error``). An end that fails is logged and returned as
        ``end_error``, not raised: the local transaction has happened, and the
        broker will ask the checker. A half message that could not be sent raises
        RaftmqError, and the local transaction does not run."""
        if not callable(local_transaction):
            raise TypeError(f"local_transaction must be callable, not {local_transaction!r}")
        half = self.begin(
            topic, body, tag, keys, properties, queue_id, broker_group=broker_group, deadline=deadline
        )
        local_error: Optional[BaseException] = None
        try:
            answer = local_transaction(half)
        except Exception as e:
            log.warning(
                "transaction %s: the local transaction raised; left UNKNOWN for the checker",
                half.transaction_id,
                exc_info=True,
            )
            resolution, local_error = TransactionResolution.UNKNOWN, e
        else:
            resolution = _resolution(answer, f"the local transaction of {half.transaction_id}")
        if resolution == TransactionResolution.UNKNOWN:
            return TransactionSendResult(half, resolution, local_error=local_error)
        try:
            end = self._end(
                half.topic, half.broker_group, half.transaction_id, resolution, pb.TRANSACTION_SOURCE_CLIENT, deadline
            )
        except RaftmqError as e:
            log.warning(
                "transaction %s: local transaction said %s, but ending it failed (%s); the broker will check back",
                half.transaction_id,
                resolution.name,
                e,
            )
            return TransactionSendResult(half, resolution, end_error=e)
        return TransactionSendResult(half, resolution, end=end)

    def _end(
        self,
        topic: str,
        broker_group: str,
        transaction_id: str,
        resolution: TransactionResolution,
        source: int,
        deadline: Optional[float],
    ) -> EndTransactionResult:
        req = pb.EndTransactionRequest(transaction_id=transaction_id, resolution=int(resolution), source=source)
        resp, _, _ = self.client.call_leader(
            topic,
            broker_group,
            lambda ep, timeout: self.client.messaging(ep).EndTransaction(req, timeout=timeout),
            deadline=self.client.send_deadline if deadline is None else deadline,
            # The same outcome again is answered already_ended: safe to resend.
            retry_timeouts=True,
        )
        return EndTransactionResult(transaction_id, resolution, resp.already_ended, resp.queue_id, resp.queue_offset)

    # -- check-back ----------------------------------------------------------

    def add_topic(self, topic: str) -> None:
        """Answers checks about ``topic``'s transactions from now on, before sending
        any (RocketMQ's ``setTopics``): a producer taking over from a crashed one.
        A send to a topic does this by itself; so does ``topics=``."""
        self._check_open()
        self._learn(topic)

    def _learn(self, topic: str) -> None:
        """A topic half messages went to: open streams to its replicas now if it is new."""
        with self._lock:
            if self._closed or topic in self._topics:
                return
            self._topics[topic] = frozenset()
        self._refresh(topics=[topic], refresh=False)

    def _watch_routes(self) -> None:
        while True:
            self._wake.wait(self.route_refresh_s)
            self._wake.clear()
            with self._lock:
                if self._closed:
                    return
            try:
                self._refresh(topics=None, refresh=True)
            except Exception:  # never let the watcher die
                log.exception("transaction checks: refreshing routes failed")

    def _refresh(self, *, topics: Optional[list[str]], refresh: bool) -> None:
        """Asks the routes of ``topics`` (all watched when None) and opens or closes
        streams so every replica of every watched topic's groups has one. A route
        that cannot be had keeps the endpoints it named last."""
        with self._lock:
            names = list(self._topics) if topics is None else topics
        found: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for topic in names:
            try:
                route = self.client.route(topic, refresh=refresh)
            except (RaftmqError, RuntimeError) as e:  # RuntimeError: the client is closed
                log.debug("transaction checks: no route for %s: %s", topic, e)
                continue
            endpoints = frozenset(ep for g in route.groups for ep in (g.leader, *g.followers) if ep)
            found[topic] = (endpoints, frozenset(g.name for g in route.groups))
        start: list[_CheckStream] = []
        stop: list[_CheckStream] = []
        with self._lock:
            if self._closed:
                return
            for topic, (endpoints, groups) in found.items():
                if topic in self._topics:
                    self._topics[topic] = endpoints
                    self._topic_groups[topic] = groups
            wanted = frozenset().union(*self._topics.values()) if self._topics else frozenset()
            for ep in sorted(wanted - self._streams.keys()):
                stream = _CheckStream(self, ep)
                self._streams[ep] = stream
                start.append(stream)
            for ep in sorted(self._streams.keys() - wanted):
                stop.append(self._streams.pop(ep))
        for s in stop:
            log.debug("transaction checks: %s left the routes; closing its stream", s.endpoint)
            s.stop()
        for s in start:
            s.start()

    def _dispatch(self, endpoint: str, check: "pb.TransactionCheck") -> None:
        """Called on a stream's thread: queues the check for the pool."""
        key = (check.broker_group, check.transaction_id)
        with self._lock:
            if self._closed:
                return
            if key in self._checking:
                log.debug("transaction %s: already being checked; this check is dropped", check.transaction_id)
                return
            self._checking.add(key)
            try:
                future = self._executor.submit(self._answer, endpoint, check)
            except RuntimeError:  # the pool is shut down: closing
                self._checking.discard(key)
                return
            self._futures.add(future)
        future.add_done_callback(lambda f: self._done(key, f))

    def _done(self, key: tuple[str, str], future: concurrent.futures.Future) -> None:
        with self._lock:
            self._checking.discard(key)
            self._futures.discard(future)

    def _topic_of(self, broker_group: str) -> Optional[str]:
        with self._lock:
            for topic, groups in self._topic_groups.items():
                if broker_group in groups:
                    return topic
        return None

    def _answer(self, endpoint: str, check: "pb.TransactionCheck") -> None:
        """Runs on the pool: asks the checker, sends its COMMIT or ROLLBACK."""
        group, tid = check.broker_group, check.transaction_id
        question = TransactionCheck(
            broker_group=group,
            transaction_id=tid,
            message=ReceivedMessage.from_pb(check.message, group),
            check_times=check.check_times,
            endpoint=endpoint,
        )
        try:
            answer = self.checker(question)
        except Exception:
            log.warning("transaction %s: the checker raised; answered UNKNOWN", tid, exc_info=True)
            return
        resolution = _resolution(answer, f"the checker, asked about {tid},")
        log.debug("transaction %s (check %d from %s): %s", tid, check.check_times, endpoint, resolution.name)
        if resolution == TransactionResolution.UNKNOWN:
            return
        topic = question.message.topic or self._topic_of(group)
        if not topic:
            log.warning("transaction %s: no topic known on broker group %s to route the answer by", tid, group)
            return
        try:
            self._end(topic, group, tid, resolution, pb.TRANSACTION_SOURCE_SERVER_CHECK, None)
        except RaftmqError as e:
            level = logging.INFO if e.code == grpc.StatusCode.NOT_FOUND else logging.WARNING
            log.log(level, "transaction %s: answering its check with %s failed: %s", tid, resolution.name, e)
        except RuntimeError as e:  # the client was closed meanwhile
            log.debug("transaction %s: not answered: %s", tid, e)

    # -- lifecycle -------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("raftmq TransactionProducer is closed")

    def close(self) -> None:
        """Closes the check streams, stops the threads (waiting up to
        ``close_timeout_s`` for running checkers; queued checks are dropped), and
        closes the Client if this producer made it."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            streams = list(self._streams.values())
            self._streams.clear()
            futures = list(self._futures)
        self._wake.set()
        for s in streams:
            s.stop()
        end = time.monotonic() + self.close_timeout_s
        self._executor.shutdown(wait=False, cancel_futures=True)
        if futures:
            concurrent.futures.wait(futures, timeout=max(0.0, end - time.monotonic()))
        for s in streams:
            s.thread.join(timeout=max(0.1, end - time.monotonic()))
        if self._watcher is not threading.current_thread():
            self._watcher.join(timeout=max(0.1, end - time.monotonic()))
        if self._owns_client:
            self.client.close()

    def __enter__(self) -> "TransactionProducer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _message(
    topic: str,
    body: Union[bytes, "pb.Message"],
    tag: str,
    keys: Iterable[str],
    properties: Optional[Mapping[str, str]],
) -> "pb.Message":
    if isinstance(body, pb.Message):
        if tag or properties or list(keys):
            raise ValueError("pass tag, keys and properties inside the pb.Message, not beside it")
        if body.topic and body.topic != topic:
            raise ValueError(f"the message's topic {body.topic!r} is not {topic!r}")
        if body.deliver_at_ms or body.delay_ms or body.delay_level:
            raise ValueError("a transactional message cannot be delayed")
        msg = pb.Message()
        msg.CopyFrom(body)
        msg.topic = topic
        if not msg.born_timestamp_ms:
            msg.born_timestamp_ms = int(time.time() * 1000)
        return msg
    if isinstance(body, str):
        raise TypeError("body must be bytes (encode the string first)")
    return pb.Message(
        topic=topic,
        tag=tag,
        keys=list(keys),
        properties=dict(properties or {}),
        body=bytes(body),
        born_timestamp_ms=int(time.time() * 1000),
    )

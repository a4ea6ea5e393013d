"""POP consumption (RocketMQ 5's SimpleConsumer): ConsumerService.Receive, Ack,
ChangeInvisibleDuration and ForwardToDeadLetter in proto/.

    consumer = raftmq.SimpleConsumer(client, "order-workers", "Orders")
    for m in consumer.receive(max_messages=16, invisible_duration_ms=30_000, max_wait_ms=5_000):
        handle(m.message)          # a ReceivedMessage
        consumer.ack(m)

* Receive hands out messages no other member of the consumer group holds, each
  with an opaque receipt handle. A message stays invisible to the group until it
  is acked or its invisible time passes; then it is handed out again with
  ``delivery_attempt`` + 1 (after the group's max_reconsume_times it goes to
  ``%DLQ%<group>`` instead). Members need no heartbeats or assignment: any number
  of them may receive from the same topic.
* Every call goes to the leader of one broker group, with the Client's
  leader-following policy (redirects, dead endpoints, asking replicas), like a
  send. A receive visits the topic's readable broker groups in turn; an ack, a
  change of invisible time or a dead-letter forward goes to the group that handed
  the message out (``PopMessage.broker_group``).
* A handle that no longer names the message's current delivery (acked, handed out
  again, or replaced by change_invisible_duration) is stale: ack reports it in
  its result, the other calls raise RaftmqError FAILED_PRECONDITION.
* A receive whose answer was lost may have handed messages out anyway: they come
  back after their invisible time (at-least-once). A retried ack may report a
  handle the first try acked as stale. change_invisible_duration is not retried
  after a timeout (it replaces the handle; the outcome is unknown): it raises.

Thread-safe as far as the Client is (calls hold no state but the rotation).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from typing import Iterable, Literal, Union

import grpc

from ._pb import pb
from .client import Client, RaftmqError, ReceivedMessage, TopicRoute

FilterType = Literal["tag", "sql92"]


@dataclass(frozen=True, slots=True)
class PopMessage:
    """A message handed out by Receive, with what acking it needs."""

    message: ReceivedMessage
    receipt_handle: str
    #: 1 on the first delivery to the group.
    delivery_attempt: int
    #: When it becomes visible again unless acked (ms since the epoch).
    invisible_until_ms: int

    @property
    def broker_group(self) -> str:
        return self.message.broker_group

    @property
    def message_id(self) -> str:
        return self.message.message_id


@dataclass(frozen=True, slots=True)
class AckResult:
    """One handle's ack: ``ok``, or ``error`` says why not (e.g. a stale handle)."""

    receipt_handle: str
    ok: bool
    error: str


Acked = Union[PopMessage, str]


def _filter_type(kind: FilterType) -> int:
    if kind == "tag":
        return pb.FILTER_TYPE_TAG
    if kind == "sql92":
        return pb.FILTER_TYPE_SQL92
    raise ValueError(f'filter_type must be "tag" or "sql92", not {kind!r}')


class SimpleConsumer:
    """A POP member of consumer group ``group`` on ``topic``.

    ``filter_expression``: "*" (every message) or "TagA || TagB" with
    ``filter_type="tag"``; a SQL92 expression over properties and TAGS (e.g.
    "region = 'eu' AND amount > 100") with ``filter_type="sql92"``. A group uses
    POP or clustering heartbeats (Consumer, push consumers), not both.
    """

    def __init__(
        self,
        client: Client,
        group: str,
        topic: str,
        filter_expression: str = "*",
        *,
        filter_type: FilterType = "tag",
    ) -> None:
        self.client = client
        self.group = group
        self.topic = topic
        self.filter_expression = filter_expression or "*"
        self._filter_type = _filter_type(filter_type)
        self._lock = threading.Lock()
        self._turn = 0

    def _next_group(self, route: TopicRoute) -> str:
        groups = [g for g in route.groups if g.readable]
        if not groups:
            raise RaftmqError(grpc.StatusCode.FAILED_PRECONDITION, f"no broker group can read topic {route.topic!r}")
        with self._lock:
            self._turn += 1
            return groups[self._turn % len(groups)].name

    def receive(
        self,
        max_messages: int = 32,
        invisible_duration_ms: int = 30_000,
        max_wait_ms: int = 0,
        *,
        broker_group: str = "",
    ) -> list[PopMessage]:
        """Up to ``max_messages`` messages from one broker group (the next in turn,
        or ``broker_group``), invisible to the group for ``invisible_duration_ms``
        (1 s to 12 h). ``max_wait_ms`` > 0 long-polls: the broker answers when a
        message is ready or the wait ends. Raises RaftmqError."""
        if not 1_000 <= invisible_duration_ms <= 12 * 3_600_000:
            raise ValueError(f"invisible_duration_ms must be 1 s to 12 h, not {invisible_duration_ms!r}")
        req = pb.ReceiveRequest(
            consumer_group=self.group,
            topic=self.topic,
            filter_type=self._filter_type,
            filter_expression=self.filter_expression,
            max_messages=max_messages,
            invisible_duration_ms=invisible_duration_ms,
            max_wait_ms=max_wait_ms,
        )
        wait = max_wait_ms / 1000
        resp, group, _ = self.client.call_leader(
            self.topic,
            broker_group or self._next_group,
            lambda ep, timeout: self.client.consumer_service(ep).Receive(req, timeout=timeout),
            deadline=self.client.send_deadline + wait,
            rpc_timeout=self.client.rpc_timeout + wait,
        )
        group = resp.broker_group or group
        return [
            PopMessage(
                ReceivedMessage.from_pb(r.message, group),
                r.receipt_handle,
                r.delivery_attempt,
                r.invisible_until_ms,
            )
            for r in resp.messages
        ]

    def ack(self, messages: Union[Acked, Iterable[Acked]], *, broker_group: str = "") -> list[AckResult]:
        """Acks messages (PopMessages, or receipt handles of ``broker_group``), one
        call per broker group; returns one AckResult per handle, in order. A stale
        handle is a result with ``ok`` False, not an exception."""
        items = [messages] if isinstance(messages, (PopMessage, str)) else list(messages)
        by_group: dict[str, list[str]] = {}
        for m in items:
            if isinstance(m, PopMessage):
                by_group.setdefault(m.broker_group, []).append(m.receipt_handle)
            else:
                if not broker_group:
                    raise ValueError("acking a bare receipt handle needs broker_group")
                by_group.setdefault(broker_group, []).append(m)
        results: dict[str, AckResult] = {}
        for group, handles in by_group.items():
            req = pb.AckRequest(consumer_group=self.group, topic=self.topic, receipt_handles=handles)
            resp, _, _ = self.client.call_leader(
                self.topic,
                group,
                lambda ep, timeout: self.client.consumer_service(ep).Ack(req, timeout=timeout),
                deadline=self.client.send_deadline,
            )
            for r in resp.results:
                results[r.receipt_handle] = AckResult(r.receipt_handle, r.ok, r.error)
        out = []
        for m in items:
            handle = m.receipt_handle if isinstance(m, PopMessage) else m
            out.append(results.get(handle) or AckResult(handle, False, "the broker returned no result for it"))
        return out

    def change_invisible_duration(self, message: PopMessage, invisible_duration_ms: int) -> PopMessage:
        """Makes ``message`` invisible for ``invisible_duration_ms`` from now (0: the
        group's retry backoff for its attempt, i.e. a nack). Returns the message
        with its new handle; the old one is stale from now on."""
        req = pb.ChangeInvisibleDurationRequest(
            consumer_group=self.group,
            topic=self.topic,
            receipt_handle=message.receipt_handle,
            invisible_duration_ms=invisible_duration_ms,
        )
        resp, _, _ = self.client.call_leader(
            self.topic,
            message.broker_group,
            lambda ep, timeout: self.client.consumer_service(ep).ChangeInvisibleDuration(req, timeout=timeout),
            deadline=self.client.send_deadline,
            # The first try may have replaced the handle: a retry would be refused as stale.
            retry_timeouts=False,
        )
        return dataclasses.replace(
            message, receipt_handle=resp.receipt_handle, invisible_until_ms=resp.invisible_until_ms
        )

    def forward_to_dead_letter(self, message: PopMessage) -> None:
        """Moves ``message`` to ``%DLQ%<group>`` at once."""
        req = pb.ForwardToDeadLetterRequest(
            consumer_group=self.group, topic=self.topic, receipt_handle=message.receipt_handle
        )
        self.client.call_leader(
            self.topic,
            message.broker_group,
            lambda ep, timeout: self.client.consumer_service(ep).ForwardToDeadLetter(req, timeout=timeout),
            deadline=self.client.send_deadline,
            retry_timeouts=False,
        )

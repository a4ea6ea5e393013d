"""End-to-end test of the Python client against a live raftmq cluster.

    python ci_test.py NAMESERVER_HOST:PORT

Run by scripts/python-client-test.sh against a fresh `raftmq dev` cluster (one
broker group of three replicas, topics auto-created with 4 queues). Steps:

  send      200 messages to a fresh topic: 200 distinct ids and (queue, offset)s
  pull      every queue read back by offset: exactly the 200, bodies intact
  errors    an empty body is refused: RaftmqError INVALID_ARGUMENT
  consume   a consumer group receives each of the 200 exactly once; after close()
            the committed offsets are at the end of every queue
  rebalance 200 more; member a starts alone, b joins mid-way: only the new 200,
            each exactly once across both, never a queue held by both, settling
            on disjoint shares covering every queue; then b leaves, 100 more, and
            a takes b's queues over from b's final offsets without a duplicate;
            offsets committed at the end again
  redirect  a raw Send to a follower fails FAILED_PRECONDITION with `raftmq-leader`
            metadata naming the leader; the wrapper's producer, told the follower
            is the leader, still stores the message by following the redirect
  delayed   three delayed sends (delay_ms, deliver_at_ms, delay_level 1) to a fresh
            topic: each result names its delivery time, and a POP receive gets
            each no earlier than that time, carrying it as deliver_at_ms
  pop       POP on a fresh topic (invisible_duration_ms 1000): 5 messages received
            once each (delivery_attempt 1) and 4 acked (a second ack of one is
            stale); the unacked one comes back after its invisible time with
            delivery_attempt 2 and nothing else does; change_invisible_duration
            replaces its handle (the old one is stale), and the new one acks
  retry     a fresh group configured (UpdateConsumerGroup on the leader) with
            max_reconsume_times 1 and retry_delays_ms [300]: a message polled,
            then send_back: it comes out of poll again (from %RETRY%<group>) with
            reconsume_times 1, its original topic and id, no earlier than 300 ms
            later; sent back again it is dead-lettered, and nothing more comes
  idempotent  the same (producer_id, sequence) sent twice on the leader, raw:
            one stored copy and the same message id and offset both times; the
            wrapper's producer carries a producer id by default
  transaction  a TransactionProducer on a fresh topic, check streams open to every
            replica: send with a local transaction answering COMMIT, ROLLBACK,
            UNKNOWN (its checker answers COMMIT) and raising (UNKNOWN; its
            checker answers ROLLBACK); begin + commit by hand (invisible to a pull
            until committed, a second commit already_ended, a rollback then
            FAILED_PRECONDITION) and begin + rollback. A consumer group gets the
            three committed messages exactly once and none of the others, and
            ListTransactions shows none of them pending at the end
  chase     the leader-following decisions (raftmq.client.Chase), no cluster
  silent    a client told that a silent endpoint (TCP accepted, never answered:
            a paused leader) leads: the first send gives up on it within
            rpc_timeout; the next send and a pull skip it, ask its replicas, and
            reach the real leader at once

Every step runs (unless an earlier one it needs failed); exits 1 naming each
failed step, 0 when all passed.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import traceback
import uuid
from typing import Callable, Iterator

import grpc

import raftmq
from raftmq import pb, pb_grpc

COUNT = 200
GROUP = "py_ci_group"


class Failure(Exception):
    pass


def require(cond: bool, why: str) -> None:
    if not cond:
        raise Failure(why)


class Run:
    def __init__(self) -> None:
        self.failed: list[str] = []
        self.skipped: list[str] = []

    def step(self, name: str, fn: Callable[[], object], needs: tuple[str, ...] = ()) -> object:
        missing = [n for n in needs if n in self.failed or n in self.skipped]
        if missing:
            print(f"SKIP {name}: needs {', '.join(missing)}", flush=True)
            self.skipped.append(name)
            return None
        started = time.monotonic()
        try:
            result = fn()
        except Failure as e:
            print(f"FAIL {name}: {e}", flush=True)
            self.failed.append(name)
            return None
        except raftmq.RaftmqError as e:
            hint = ""
            if e.code == grpc.StatusCode.UNIMPLEMENTED:
                hint = " (the broker binary does not implement this service: older than proto/?)"
            print(f"FAIL {name}: RaftmqError {e}{hint}", flush=True)
            self.failed.append(name)
            return None
        except Exception:  # a bug in the client or the test: report it, run the rest
            print(f"FAIL {name}: unexpected exception", flush=True)
            traceback.print_exc()
            self.failed.append(name)
            return None
        print(f"ok   {name} ({time.monotonic() - started:.1f} s)", flush=True)
        return result


def wait_for_route(client: raftmq.Client, topic: str) -> raftmq.TopicRoute:
    """The NameServer learns an auto-created topic from the brokers' next registration."""
    deadline = time.monotonic() + 30
    while True:
        route = client.route(topic, refresh=True)
        if not route.provisional and route.groups and all(g.queues > 0 for g in route.groups):
            return route
        require(time.monotonic() < deadline, f"the NameServer did not learn topic {topic} within 30 s")
        time.sleep(0.2)


def send_all(client: raftmq.Client, topic: str, first: int, count: int) -> dict[str, raftmq.SendResult]:
    producer = client.producer()
    sent: dict[str, raftmq.SendResult] = {}
    places = set()
    for seq in range(first, first + count):
        r = producer.send(
            topic, f"body-{seq}".encode(), tag="TagA", keys=[f"key-{seq}"], properties={"seq": str(seq)}
        )
        require(len(r.message_id) == 34, f"message id {r.message_id!r} is not 34 characters")
        require(r.message_id not in sent, f"message id {r.message_id} returned twice")
        require((r.broker_group, r.queue_id, r.queue_offset) not in places, f"two sends stored at {r}")
        sent[r.message_id] = r
        places.add((r.broker_group, r.queue_id, r.queue_offset))
    print(f"     sent {count} messages to {topic}: queues {sorted({r.queue_id for r in sent.values()})}")
    return sent


def check_message(m: raftmq.ReceivedMessage, sent: dict[str, raftmq.SendResult]) -> int:
    r = sent.get(m.message_id)
    require(r is not None, f"received {m.message_id}, which was not sent by this step")
    seq = int(m.properties.get("seq", "-1"))
    require(m.body == f"body-{seq}".encode(), f"{m.message_id}: body {m.body!r} does not match seq {seq}")
    require(m.tag == "TagA" and m.keys == (f"key-{seq}",), f"{m.message_id}: tag/keys lost: {m.tag!r} {m.keys}")
    require(
        (m.broker_group, m.queue_id, m.queue_offset) == (r.broker_group, r.queue_id, r.queue_offset),
        f"{m.message_id} received at {m.broker_group}/{m.queue_id}@{m.queue_offset}, sent to {r}",
    )
    return seq


def pull_all(client: raftmq.Client, route: raftmq.TopicRoute, sent: dict[str, raftmq.SendResult]) -> None:
    seen: set[str] = set()
    for g in route.groups:
        for q in range(g.queues):
            offset = 0
            while True:
                res = client.pull(route.topic, g.name, q, offset, max_messages=17)
                for m in res.messages:
                    check_message(m, sent)
                    require(m.message_id not in seen, f"pull returned {m.message_id} twice")
                    seen.add(m.message_id)
                require(res.next_offset >= offset, f"next_offset went back from {offset} to {res.next_offset}")
                if res.next_offset >= res.max_offset:
                    break
                require(res.messages, f"{g.name}/{q}@{offset}: empty answer below max_offset {res.max_offset}")
                offset = res.next_offset
    require(len(seen) == len(sent), f"pulled {len(seen)} of {len(sent)} messages")
    # Long polling on an empty tail waits, then answers empty.
    g = route.groups[0]
    end = client.pull(route.topic, g.name, 0, 0).max_offset
    started = time.monotonic()
    res = client.pull(route.topic, g.name, 0, end, max_wait_ms=300)
    waited = time.monotonic() - started
    require(not res.messages and res.next_offset == end, f"pull at the end returned {res}")
    require(waited >= 0.2, f"a 300 ms long poll answered after {waited * 1000:.0f} ms")


def check_errors(client: raftmq.Client, topic: str) -> None:
    try:
        client.producer().send(topic, b"")
    except raftmq.RaftmqError as e:
        require(e.code == grpc.StatusCode.INVALID_ARGUMENT, f"an empty body got {e.code.name}, not INVALID_ARGUMENT")
        require(bool(e.message), "INVALID_ARGUMENT without a message")
        return
    raise Failure("an empty body was accepted")


def check_committed(client: raftmq.Client, route: raftmq.TopicRoute, expect_total: int) -> None:
    total = 0
    for g in route.groups:
        for q in range(g.queues):
            o = client.query_offset(GROUP, route.topic, g.name, q)
            require(
                o.committed == o.max_offset,
                f"{g.name}/{q}: committed offset {o.committed}, queue end {o.max_offset}",
            )
            total += o.committed or 0
    require(total == expect_total, f"committed offsets add up to {total}, not {expect_total}")


def consume_one(client: raftmq.Client, route: raftmq.TopicRoute, sent: dict[str, raftmq.SendResult]) -> None:
    consumer = raftmq.Consumer(client, GROUP, route.topic, start_from="first")
    got: dict[int, str] = {}
    try:
        deadline = time.monotonic() + 60
        while len(got) < len(sent):
            require(
                time.monotonic() < deadline,
                f"received {len(got)} of {len(sent)} within 60 s; assignment {consumer.assignment}, "
                f"last error {consumer.last_error}",
            )
            for m in consumer.poll(timeout_s=1.0):
                seq = check_message(m, sent)
                require(seq not in got, f"seq {seq} ({m.message_id}) delivered twice")
                got[seq] = m.message_id
        # Nothing more may arrive: every message was delivered exactly once.
        quiet_until = time.monotonic() + 1.5
        while time.monotonic() < quiet_until:
            extra = consumer.poll(timeout_s=0.5)
            if extra:
                raise Failure(f"{len(extra)} more deliveries after all {len(sent)}: {extra[0].message_id}")
        held = consumer.assignment
        require(
            sorted(held) == [(g.name, q) for g in route.groups for q in range(g.queues)],
            f"a lone member should hold every queue, holds {sorted(held)}",
        )
    finally:
        consumer.close()
    check_committed(client, route, len(sent))
    print(f"     {len(got)} messages, each exactly once; offsets committed at every queue's end")


def consume_two(client: raftmq.Client, route: raftmq.TopicRoute, before: int) -> None:
    """Member a starts alone; b joins while a is mid-way (a consumes one message per
    queue per poll, so the 200 take a few heartbeat intervals): a must release half
    of its queues with their offsets and b continue from them. Then b leaves and a
    takes b's queues over from b's final offsets. Nothing twice, nothing lost."""
    all_queues = sorted((g.name, q) for g in route.groups for q in range(g.queues))
    sent = send_all(client, route.topic, before, COUNT)
    a = raftmq.Consumer(client, GROUP, route.topic, client_id="py-ci-member-a", pull_batch=1)
    b = raftmq.Consumer(client, GROUP, route.topic, client_id="py-ci-member-b", pull_batch=1)
    members = {"a": a, "b": b}
    got: dict[int, str] = {}
    per_member = {"a": 0, "b": 0}
    closed: set[str] = set()

    def poll(name: str, wanted: dict[str, raftmq.SendResult]) -> None:
        for m in members[name].poll(timeout_s=0.2):
            seq = check_message(m, wanted)  # nothing sent by an earlier step again
            require(seq not in got, f"seq {seq} delivered twice (second time to member {name})")
            got[seq] = m.message_id
            per_member[name] += 1

    try:
        deadline = time.monotonic() + 60
        settled = False
        while len(got) < len(sent) or not settled:
            require(
                time.monotonic() < deadline,
                f"received {len(got)} of {len(sent)} (settled: {settled}) within 60 s; "
                f"a holds {sorted(a.assignment)}, b holds {sorted(b.assignment)}",
            )
            poll("a", sent)
            if per_member["a"] >= 8:  # b joins once a is consuming
                poll("b", sent)
            ha, hb = set(a.assignment), set(b.assignment)
            require(not (ha & hb), f"queues {sorted(ha & hb)} held by both members at once")
            settled = bool(ha) and bool(hb) and sorted(ha | hb) == all_queues
            time.sleep(0.05)  # "processing": keeps a busy past its next heartbeat
        require(per_member["b"] > 0, "b joined mid-way but received nothing: no queue moved with messages left")
        print(
            f"     {len(got)} messages exactly once; b joined after a had {8}+: a got {per_member['a']}, "
            f"b got {per_member['b']}; settled on a={sorted(q for _, q in a.assignment)} "
            f"b={sorted(q for _, q in b.assignment)}"
        )

        b.close()
        closed.add("b")
        more = send_all(client, route.topic, before + COUNT, COUNT // 2)
        got.clear()
        while len(got) < len(more) or sorted(a.assignment) != all_queues:
            require(
                time.monotonic() < deadline,
                f"after b left, a received {len(got)} of {len(more)} and holds {sorted(a.assignment)}",
            )
            poll("a", more)
        print(f"     b left; a took over every queue and got the {len(more)} new messages exactly once")
    finally:
        errors = []
        for name, member in members.items():
            if name not in closed:
                try:
                    member.close()
                except raftmq.RaftmqError as e:
                    errors.append(e)
        if errors:
            raise errors[0]
    check_committed(client, route, before + COUNT + COUNT // 2)


def now_ms() -> int:
    return int(time.time() * 1000)


def delayed(client: raftmq.Client) -> None:
    topic = f"PyDelay_{uuid.uuid4().hex[:10]}"
    producer = client.producer()
    sent_at = now_ms()
    results = {
        "delay_ms": producer.send(topic, b"rel", properties={"kind": "delay_ms"}, delay_ms=1500),
        "deliver_at_ms": producer.send(topic, b"abs", properties={"kind": "deliver_at_ms"}, deliver_at_ms=sent_at + 2000),
        "delay_level": producer.send(topic, b"lvl", properties={"kind": "delay_level"}, delay_level=1),
    }
    expected_delay = {"delay_ms": 1500, "deliver_at_ms": 2000, "delay_level": 1000}
    for kind, r in results.items():
        require(r.queue_offset == 0, f"{kind}: a delayed send got queue offset {r.queue_offset}")
        # The broker's clock counts (same machine here): allow it a little skew.
        require(
            r.deliver_at_ms >= sent_at + expected_delay[kind] - 50,
            f"{kind}: due at {r.deliver_at_ms}, sooner than {expected_delay[kind]} ms after {sent_at}",
        )
    require(results["deliver_at_ms"].deliver_at_ms == sent_at + 2000, f"deliver_at_ms moved: {results['deliver_at_ms']}")
    try:
        raftmq.Producer(client).send(topic, b"x", delay_ms=10, delay_level=1)
        raise Failure("a send with two delays was accepted")
    except ValueError:
        pass
    consumer = raftmq.SimpleConsumer(client, "py_delay_group", topic)
    by_id = {r.message_id: (kind, r) for kind, r in results.items()}
    got: dict[str, int] = {}
    deadline = time.monotonic() + 30
    while len(got) < len(results):
        require(time.monotonic() < deadline, f"received {sorted(got)} of 3 delayed messages within 30 s")
        for m in consumer.receive(max_messages=8, invisible_duration_ms=30_000, max_wait_ms=1000):
            at = now_ms()
            require(m.message_id in by_id, f"received {m.message_id}, which was not sent")
            kind, r = by_id[m.message_id]
            require(kind not in got, f"{kind} received twice")
            require(at >= r.deliver_at_ms, f"{kind} received at {at}, before it was due at {r.deliver_at_ms}")
            require(
                m.message.deliver_at_ms == r.deliver_at_ms and m.message.properties.get("kind") == kind,
                f"{kind}: received as {m.message}",
            )
            require(all(a.ok for a in consumer.ack(m)), f"{kind}: ack refused")
            got[kind] = at - r.deliver_at_ms
    print(f"     each delayed message received after its time (late by {got} ms)")


def configure_group(client: raftmq.Client, topic: str, config: "pb.ConsumerGroupConfig") -> None:
    """UpdateConsumerGroup on the leader of every broker group serving ``topic``."""
    req = pb.UpdateConsumerGroupRequest(config=config)
    for g in client.route(topic).groups:
        client.call_leader(
            topic,
            g.name,
            lambda ep, t: pb_grpc.AdminServiceStub(client.channel(ep)).UpdateConsumerGroup(req, timeout=t),
            deadline=client.send_deadline,
        )


def retry(client: raftmq.Client) -> None:
    topic = f"PyRetry_{uuid.uuid4().hex[:10]}"
    group = f"py_retry_{uuid.uuid4().hex[:10]}"
    sent = client.producer().send(topic, b"fail me", tag="R", keys=["retry-1"])
    wait_for_route(client, topic)
    configure_group(client, topic, pb.ConsumerGroupConfig(name=group, max_reconsume_times=1, retry_delays_ms=[300]))

    def next_message(consumer: raftmq.Consumer, within_s: float) -> raftmq.ReceivedMessage:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            got = consumer.poll(timeout_s=0.5)
            if got:
                require(len(got) == 1, f"one message expected, polled {[(m.topic, m.message_id) for m in got]}")
                return got[0]
        raise Failure(f"nothing polled within {within_s} s (last error {consumer.last_error})")

    with raftmq.Consumer(client, group, topic) as consumer:
        first = next_message(consumer, 30)
        require(
            first.message_id == sent.message_id and first.reconsume_times == 0 and first.topic == topic,
            f"first delivery: {first}",
        )
        sent_back_at = now_ms()
        require(consumer.send_back(first) is False, "the first send-back was dead-lettered (max_reconsume_times 1)")
        again = next_message(consumer, 30)
        at = now_ms()
        require(
            again.message_id == sent.message_id and again.body == b"fail me" and again.tag == "R",
            f"the retry is not the message sent back: {again}",
        )
        require(again.reconsume_times == 1, f"the retry has reconsume_times {again.reconsume_times}, not 1")
        require(again.topic == topic, f"the retry's topic is {again.topic!r}, not the original {topic!r}")
        require(
            again.properties.get("ORIGIN_TOPIC") == topic,
            f"the retry's ORIGIN_TOPIC is {again.properties.get('ORIGIN_TOPIC')!r}",
        )
        require(at - sent_back_at >= 290, f"the retry came {at - sent_back_at} ms after the send-back, before its 300 ms")
        require(
            any(k[0] == again.broker_group for k in consumer.retry_assignment),
            f"the retry member holds {consumer.retry_assignment}",
        )
        require(consumer.send_back(again) is True, "the second send-back was not dead-lettered (max_reconsume_times 1)")
        extra = consumer.poll(timeout_s=1.5)
        require(not extra, f"polled {[(m.topic, m.message_id, m.reconsume_times) for m in extra]} after dead-lettering")
        consumer.commit()
    print(f"     retried {at - sent_back_at} ms after send_back (reconsume_times 1), then dead-lettered")


def pop(client: raftmq.Client) -> None:
    topic = f"PyPop_{uuid.uuid4().hex[:10]}"
    producer = client.producer()
    sent = {producer.send(topic, f"pop-{i}".encode(), properties={"seq": str(i)}).message_id for i in range(5)}
    consumer = raftmq.SimpleConsumer(client, "py_pop_group", topic)
    first: dict[str, raftmq.PopMessage] = {}
    deadline = time.monotonic() + 30
    while len(first) < len(sent):
        require(time.monotonic() < deadline, f"received {len(first)} of {len(sent)} within 30 s")
        for m in consumer.receive(max_messages=32, invisible_duration_ms=1000, max_wait_ms=500):
            require(m.message_id in sent, f"received {m.message_id}, which was not sent")
            if m.message_id in first:
                # Redelivered before all arrived (a slow run): only once its time passed.
                require(m.delivery_attempt >= 2, f"{m.message_id} handed out twice as attempt 1")
                continue
            require(m.delivery_attempt == 1, f"{m.message_id}: first delivery is attempt {m.delivery_attempt}")
            first[m.message_id] = m
    kept_id = sorted(first)[0]
    kept = first[kept_id]
    acked = [m for i, m in first.items() if i != kept_id]
    results = consumer.ack(acked)
    require(all(r.ok for r in results), f"acks refused: {[r for r in results if not r.ok]}")
    again = consumer.ack(acked[0])[0]
    require(not again.ok and "stale" in again.error, f"a second ack of one handle: {again}")
    # The unacked one comes back after its invisible time, as attempt 2; nothing else does.
    back = None
    deadline = time.monotonic() + 15
    while back is None:
        require(time.monotonic() < deadline, f"{kept_id} did not come back within 15 s")
        for m in consumer.receive(max_messages=32, invisible_duration_ms=1000, max_wait_ms=1000):
            require(m.message_id == kept_id, f"{m.message_id} came back although it was acked")
            if m.delivery_attempt == 2:
                back = (m, now_ms())
    m, at = back
    require(at >= kept.invisible_until_ms, f"back at {at}, before its invisible time {kept.invisible_until_ms}")
    moved = consumer.change_invisible_duration(m, 5000)
    require(moved.receipt_handle != m.receipt_handle, "change_invisible_duration kept the handle")
    stale = consumer.ack(m)[0]
    require(not stale.ok and "stale" in stale.error, f"the replaced handle still acks: {stale}")
    require(consumer.ack(moved)[0].ok, "the new handle does not ack")
    quiet = consumer.receive(max_messages=32, invisible_duration_ms=1000, max_wait_ms=1500)
    require(not quiet, f"received {[q.message_id for q in quiet]} after everything was acked")
    print(f"     5 received, 4 acked, 1 back as attempt 2 after {at - kept.invisible_until_ms} ms past its time")


def idempotent(client: raftmq.Client, topic: str) -> None:
    group = client.route(topic, refresh=True).groups[0]
    require(bool(group.leader), f"the route names no leader: {group}")
    body = f"idempotent-{uuid.uuid4().hex}".encode()
    req = pb.SendRequest(
        topic=topic, queue_id=0, messages=[pb.Message(topic=topic, body=body)], producer_id="py-ci", sequence=7
    )
    with grpc.insecure_channel(group.leader) as channel:
        stub = pb_grpc.MessagingServiceStub(channel)
        first = stub.Send(req, timeout=5)
        again = stub.Send(req, timeout=5)
    require(first == again, f"a retried send was answered differently: {first} vs {again}")
    copies = 0
    offset = 0
    while True:
        r = client.pull(topic, group.name, 0, offset, max_messages=256)
        copies += sum(1 for m in r.messages if m.body == body)
        if not r.messages or r.next_offset >= r.max_offset:
            break
        offset = r.next_offset
    require(copies == 1, f"{copies} stored copies of one idempotent send")
    require(bool(raftmq.Producer(client).producer_id), "the producer is not idempotent by default")


@contextlib.contextmanager
def captured_log(name: str) -> Iterator[list[logging.LogRecord]]:
    """Records logger ``name``'s warnings and errors in a list instead of printing them."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger(name)
    logger.addHandler(handler)
    propagate, logger.propagate = logger.propagate, False
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.propagate = propagate


def list_transactions(
    client: raftmq.Client, topic: str, broker_group: str, producer_group: str
) -> "pb.ListTransactionsResponse":
    """AdminService.ListTransactions at ``broker_group``'s leader (its applied state is the freshest)."""
    req = pb.ListTransactionsRequest(producer_group=producer_group, max_transactions=1000)
    resp, _, _ = client.call_leader(
        topic,
        broker_group,
        lambda ep, t: pb_grpc.AdminServiceStub(client.channel(ep)).ListTransactions(req, timeout=t),
        deadline=client.send_deadline,
        ask_followers=True,
    )
    return resp


def transaction(client: raftmq.Client) -> None:
    topic = f"PyTx_{uuid.uuid4().hex[:10]}"
    producer_group = f"py_tx_producer_{uuid.uuid4().hex[:10]}"
    consumer_group = f"py_tx_consumer_{uuid.uuid4().hex[:10]}"
    TR = raftmq.TransactionResolution
    checks: list[raftmq.TransactionCheck] = []  # appended from the checker pool

    def checker(check: raftmq.TransactionCheck) -> raftmq.TransactionResolution:
        checks.append(check)
        return {"commit": TR.COMMIT, "rollback": TR.ROLLBACK}.get(check.message.properties.get("check", ""), TR.UNKNOWN)

    def failing(half: raftmq.HalfMessage) -> raftmq.TransactionResolution:
        raise RuntimeError(f"the local transaction of {half.transaction_id} failed (on purpose)")

    # The producer logs the failing local transaction: kept, not printed.
    with (
        captured_log("raftmq.transaction") as logged,
        raftmq.TransactionProducer(client, producer_group, checker) as producer,
    ):
        committed = producer.send(topic, b"tx-commit", lambda h: TR.COMMIT, tag="Tx", properties={"kind": "commit"})
        require(
            committed.resolution == TR.COMMIT and committed.ended and committed.end_error is None,
            f"a local COMMIT did not end the transaction: {committed}",
        )
        require(
            committed.transaction_id == committed.message_id and len(committed.message_id) == 34,
            f"transaction id {committed.transaction_id!r} vs message id {committed.message_id!r}",
        )
        route = wait_for_route(client, topic)
        replicas = {ep for g in route.groups for ep in (g.leader, *g.followers) if ep}
        deadline = time.monotonic() + 15
        while True:
            streams = producer.check_streams
            if set(streams) >= replicas and all(streams[ep] for ep in replicas):
                break
            require(
                time.monotonic() < deadline,
                f"check streams to every replica {sorted(replicas)} not open within 15 s: {streams}",
            )
            time.sleep(0.05)
        counts_before = {g.name: list_transactions(client, topic, g.name, producer_group) for g in route.groups}

        rolled = producer.send(topic, b"tx-rollback", lambda h: TR.ROLLBACK, tag="Tx", properties={"kind": "rollback"})
        require(rolled.resolution == TR.ROLLBACK and rolled.ended, f"a local ROLLBACK did not end it: {rolled}")
        unknown = producer.send(
            topic, b"tx-unknown", lambda h: TR.UNKNOWN, tag="Tx", properties={"kind": "unknown", "check": "commit"}
        )
        require(unknown.resolution == TR.UNKNOWN and not unknown.ended, f"a local UNKNOWN ended something: {unknown}")
        raised = producer.send(topic, b"tx-raise", failing, tag="Tx", properties={"kind": "raise", "check": "rollback"})
        require(
            raised.resolution == TR.UNKNOWN and isinstance(raised.local_error, RuntimeError) and not raised.ended,
            f"a raising local transaction: {raised}",
        )
        require(
            any(raised.transaction_id in r.getMessage() and r.exc_info for r in logged),
            f"the raising local transaction was not logged with its traceback: {[r.getMessage() for r in logged]}",
        )

        # By hand: invisible until committed, then where the commit says.
        half = producer.begin(topic, pb.Message(body=b"tx-manual", tag="Tx", properties={"kind": "manual"}))
        page = client.pull(topic, half.broker_group, half.queue_id, 0, max_messages=256)
        require(
            all(m.body != b"tx-manual" for m in page.messages),
            f"the half message {half.transaction_id} is visible before its commit",
        )
        end = producer.commit(half)
        require(not end.already_ended, f"the first commit of {half.transaction_id} says already_ended")
        back = client.pull(topic, half.broker_group, end.queue_id, end.queue_offset, max_messages=1)
        require(
            bool(back.messages)
            and back.messages[0].body == b"tx-manual"
            and back.messages[0].queue_offset == end.queue_offset,
            f"the committed message is not at {half.broker_group}/{end.queue_id}@{end.queue_offset}: {back.messages}",
        )
        require(producer.commit(half).already_ended, "a second commit is not already_ended")
        try:
            producer.rollback(half)
            raise Failure(f"rolling back the committed {half.transaction_id} was accepted")
        except raftmq.RaftmqError as e:
            require(e.code == grpc.StatusCode.FAILED_PRECONDITION, f"rolling back a committed transaction: {e}")
        gone = producer.begin(topic, b"tx-manual-rollback", tag="Tx", properties={"kind": "manual-rollback"})
        require(not producer.rollback(gone).already_ended, "the first rollback says already_ended")
        try:
            producer.commit(gone)
            raise Failure(f"committing the rolled-back {gone.transaction_id} was accepted")
        except raftmq.RaftmqError as e:
            require(e.code == grpc.StatusCode.FAILED_PRECONDITION, f"committing a rolled-back transaction: {e}")

        # The committed ones, each exactly once; the check-back commits "unknown".
        wanted = {"commit", "unknown", "manual"}
        got: dict[str, raftmq.ReceivedMessage] = {}
        with raftmq.Consumer(client, consumer_group, topic, start_from="first") as consumer:
            deadline = time.monotonic() + 60
            while set(got) != wanted:
                require(
                    time.monotonic() < deadline,
                    f"consumed {sorted(got)} of {sorted(wanted)} within 60 s; checks so far "
                    f"{[(c.transaction_id, c.check_times) for c in checks]}",
                )
                for m in consumer.poll(timeout_s=0.5):
                    kind = m.properties.get("kind", "?")
                    require(kind in wanted, f"consumed {kind!r} ({m.message_id}), which was never committed")
                    require(kind not in got, f"{kind} consumed twice ({m.message_id})")
                    got[kind] = m
            check = next((c for c in checks if c.transaction_id == unknown.transaction_id), None)
            require(check is not None, f"{unknown.transaction_id} became visible without a check")
            require(
                check.check_times >= 1 and check.message.body == b"tx-unknown" and check.message.topic == topic,
                f"the check: {check}",
            )
            require(got["unknown"].body == b"tx-unknown", f"the checked message: {got['unknown']}")
            # The raising one is rolled back by its check: nothing pending any more.
            pending: list[str] = []
            while True:
                pending = [
                    t.transaction_id
                    for g in route.groups
                    for t in list_transactions(client, topic, g.name, producer_group).transactions
                ]
                if not pending:
                    break
                require(
                    time.monotonic() < deadline,
                    f"still pending after 60 s: {pending}; "
                    f"checks {[(c.transaction_id, c.check_times) for c in checks]}",
                )
                time.sleep(0.1)
            require(
                any(c.transaction_id == raised.transaction_id for c in checks),
                f"{raised.transaction_id} stopped being pending without a check",
            )
            extra = consumer.poll(timeout_s=1.0)
            require(not extra, f"consumed {[m.properties.get('kind') for m in extra]} after all three")
        committed_n = rolled_back_n = 0
        for g in route.groups:
            after = list_transactions(client, topic, g.name, producer_group)
            committed_n += after.committed - counts_before[g.name].committed
            rolled_back_n += after.rolled_back - counts_before[g.name].rolled_back
        # Since counts_before: unknown + manual committed; rollback, raise and manual-rollback rolled back.
        require(
            (committed_n, rolled_back_n) == (2, 3),
            f"ListTransactions counted {committed_n} commits and {rolled_back_n} rollbacks, not 2 and 3",
        )
        sent_ids = {"commit": committed.message_id, "unknown": unknown.message_id, "manual": half.message_id}
        for kind, sent_id in sent_ids.items():
            require(
                got[kind].message_id == sent_id, f"{kind} was sent as {sent_id}, consumed as {got[kind].message_id}"
            )
    first_check = min(c.check_times for c in checks)
    print(
        f"     commit, check-back commit and manual commit consumed once each, under their send ids; "
        f"3 rollbacks never seen; {len(checks)} check(s), the first one's check_times {first_check}"
    )


def redirect(client: raftmq.Client, topic: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        group = client.route(topic, refresh=True).groups[0]
        if group.leader and group.followers:
            break
        require(time.monotonic() < deadline, f"the route never named a leader and followers: {group}")
        time.sleep(0.2)
    follower = group.followers[0]

    # The wire contract, with a raw stub and a channel of its own.
    with grpc.insecure_channel(follower) as channel:
        stub = pb_grpc.MessagingServiceStub(channel)
        req = pb.SendRequest(topic=topic, messages=[pb.Message(topic=topic, body=b"to a follower")])
        try:
            stub.Send(req, timeout=5)
            raise Failure(f"follower {follower} accepted a write")
        except grpc.RpcError as e:
            code = e.code()
            metadata = dict(e.trailing_metadata() or ()) | dict(e.initial_metadata() or ())
    require(
        code == grpc.StatusCode.FAILED_PRECONDITION,
        f"follower {follower} answered {code.name}, not FAILED_PRECONDITION",
    )
    require("raftmq-leader" in metadata, f"follower {follower} sent no raftmq-leader metadata: {metadata}")
    leader = metadata["raftmq-leader"]
    require(leader == group.leader, f"raftmq-leader={leader!r}, the route's leader is {group.leader!r}")
    print(f"     follower {follower}: FAILED_PRECONDITION, raftmq-leader={leader}")

    # The wrapper, forced to start at the follower, follows the redirect.
    client.set_leader(group.name, follower)
    require(client.leader(topic, group.name) == follower, "set_leader did not take")
    r = client.producer().send(topic, b"redirected", properties={"seq": "redirect"}, broker_group=group.name)
    require(
        client.leader(topic, group.name) == leader,
        f"after the send the client believes {client.leader(topic, group.name)} leads, not {leader}",
    )
    back = client.pull(topic, group.name, r.queue_id, r.queue_offset, max_messages=1)
    require(
        back.messages and back.messages[0].message_id == r.message_id and back.messages[0].body == b"redirected",
        f"the redirected send is not stored where its result says: {r}",
    )
    print(f"     a send started at {follower} was redirected to {leader}, stored as {r.message_id}")


def chase() -> None:
    from raftmq.client import LEADERLESS, REDIRECT, UNREACHABLE, Chase

    def dead(*names: str) -> Callable[[str], bool]:
        return lambda e: e in names

    c = Chase()
    require(c.next("l", ["f1", "f2"], dead()) == ("l", True), "a live leader is dialled")
    pause, _ = c.observe("l", UNREACHABLE, "", 3, dead("l"))
    require(pause == 0, "the first follower is asked at once after a failure")
    require(c.next("l", ["f1", "f2"], dead("l")) == ("f1", False), "a dead leader's follower is asked")
    pause, _ = c.observe("f1", REDIRECT, "l", 3, dead("l"))
    require(pause > 0, "a redirect to the endpoint that just failed means: wait and ask again")
    require(c.next("l", ["f1", "f2"], dead("l")) == ("f2", False), "the followers are asked in turn")
    pause, _ = c.observe("f2", REDIRECT, "f1", 3, dead("l"))
    require(pause == 0 and c.next("l", ["f1", "f2"], dead("l")) == ("f1", True), "a live redirect is followed at once")
    c = Chase()
    refreshes = [c.observe("f1", LEADERLESS, "", 3, dead())[1] for _ in range(6)]
    require(refreshes == [False, False, True, False, False, True], f"route refreshes: {refreshes}")
    require(Chase().next("l", ["f1"], dead("l", "f1")) is None, "every replica dead: nothing to dial")


def silent(nameserver: str, topic: str) -> None:
    import socket

    rpc_timeout = 0.5
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # never accepted: the kernel completes handshakes, nobody answers
    silent_ep = f"127.0.0.1:{hole.getsockname()[1]}"
    try:
        with raftmq.Client([nameserver], rpc_timeout=rpc_timeout) as client:
            group = wait_for_route(client, topic).groups[0]
            client.set_leader(group.name, silent_ep)
            started = time.monotonic()
            # gRPC fails the call either when rpc_timeout passes (DEADLINE_EXCEEDED:
            # raised, the send's outcome is unknown) or earlier, when its HTTP/2
            # handshake gives up (UNAVAILABLE: the replicas are asked and the send
            # gets through). Either way the endpoint is then remembered as dead.
            try:
                client.producer().send(topic, b"to a silent leader", broker_group=group.name)
                how = "UNAVAILABLE, then redirected"
            except raftmq.RaftmqError as e:
                require(e.code == grpc.StatusCode.DEADLINE_EXCEEDED, f"the silent leader gave {e}")
                how = "DEADLINE_EXCEEDED"
            took = time.monotonic() - started
            require(took < rpc_timeout + 2, f"giving up on the silent leader took {took:.2f} s")
            require(client.is_dead(silent_ep), "the silent endpoint is not remembered as dead")
            client.set_leader(group.name, silent_ep)  # a stale hint, as from a NameServer
            started = time.monotonic()
            r = client.producer().send(topic, b"past a silent leader", broker_group=group.name)
            took = time.monotonic() - started
            require(took < rpc_timeout, f"the second send took {took:.2f} s: it waited on the silent endpoint")
            leader = client.leader(topic, group.name)
            require(leader not in ("", silent_ep), f"after the send the client believes {leader!r} leads")
            client.set_leader(group.name, silent_ep)
            back = client.pull(topic, group.name, r.queue_id, r.queue_offset, max_messages=1)
            require(
                back.messages and back.messages[0].message_id == r.message_id,
                "the pull past the silent leader did not return the message just sent",
            )
            print(f"     gave up on {silent_ep} ({how}) after {took:.2f} s; then reached {leader} at once")
    finally:
        hole.close()


def main() -> int:
    if len(sys.argv) != 2:
        print("usage: ci_test.py NAMESERVER_HOST:PORT", file=sys.stderr)
        return 2
    topic = f"PyCi_{uuid.uuid4().hex[:10]}"
    run = Run()
    with raftmq.Client([sys.argv[1]]) as client:
        sent = run.step("send", lambda: send_all(client, topic, 0, COUNT)) or {}
        route = run.step("route", lambda: wait_for_route(client, topic), needs=("send",))
        run.step("pull", lambda: pull_all(client, route, sent), needs=("send", "route"))
        run.step("errors", lambda: check_errors(client, topic))
        run.step("consume", lambda: consume_one(client, route, sent), needs=("send", "route"))
        run.step("rebalance", lambda: consume_two(client, route, COUNT), needs=("consume",))
        run.step("redirect", lambda: redirect(client, topic), needs=("send",))
        run.step("delayed", lambda: delayed(client))
        run.step("pop", lambda: pop(client))
        run.step("retry", lambda: retry(client))
        run.step("idempotent", lambda: idempotent(client, topic), needs=("send",))
        run.step("transaction", lambda: transaction(client))
        run.step("chase", chase)
        run.step("silent", lambda: silent(sys.argv[1], topic), needs=("send",))
    if run.failed or run.skipped:
        print(
            f"python client: FAILED ({', '.join(run.failed)} failed"
            + (f"; {', '.join(run.skipped)} skipped" if run.skipped else "")
            + ")",
            file=sys.stderr,
        )
        return 1
    print("python client: OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The official RocketMQ 5 Python SDK (rocketmq-python-client 5.1.2) against raftmq's gateway.

    python sdk_test.py --access-point HOST:PORT --namesrv HOST:PORT --bin RAFTMQ [--data-dir DIR]
                       [--steps a,b,...] [--fail-fast]

Run by scripts/rocketmq-python-sdk-test.sh against a fresh `raftmq dev` cluster. The SDK is
used only through its public API (`from rocketmq import ...`), the way its own examples use it;
topics and consumer groups are made up front with the raftmq CLI, with names unique to the run.
Each step prints `ok <step> ...` or `FAIL <step>: expected ..., got ...`; every wait has a
deadline. Steps (in order):

  producer_normal   Producer sends 5 messages tagged tagA and 2 tagged tagB, each with a key and
                    user properties: every send returns a message id
  simple_consumer   SimpleConsumer filtering tagA receives the 5 (body, tag, key, properties,
                    the producer's message id, delivery_attempt >= 1) and acks them; a later
                    receive gets none of them again and never a tagB one
  change_invisible  a message received with invisible 3 s, changed to 30 s: it stays invisible past
                    the first 3 s, and the handle change_invisible_duration returned acks it
  redelivery        a message received with invisible 2 s and not acked comes back after it with
                    the same id and a higher delivery_attempt; the new handle acks it
  fifo              FIFO topic, message groups g1/g2 interleaved; a FIFO consumer group (--fifo)
                    via SimpleConsumer: while the first message (received alone) is unacked, a
                    receive gets nothing of its group; each group arrives in send order
  delay             delivery_timestamp = int(time.time()) + 3 (whole seconds, as the SDK's example
                    does): not receivable before that time, received soon after
  transaction       Producer with a TransactionChecker: a committed transaction is received, a
                    rolled-back one never is, an unresolved one is checked back (checker answers
                    COMMIT) and then received
  push_concurrent   PushConsumer whose listener returns SUCCESS consumes each of 20 messages once
  push_fifo         PushConsumer on a FIFO group consumes each message group in send order
  retry_dlq         a group with --max-retries 2 --retry-delays-ms 1000 and a listener that always
                    returns FAILURE: the message is redelivered (attempts counted) and then is in
                    the group's dead-letter queue (`raftmq admin dlq list`), and not delivered again
  bad_input         a send to a topic that does not exist (or, with dev's auto-create, is made),
                    a body over 4 MiB, a 200-character topic name and a NORMAL message to a FIFO
                    topic: each refused with an exception, none hangs

Exit status 0 only if every step passed. The SDK logs to ~/logs/rocketmq_python/rocketmq_client.log.
"""

import argparse
import contextlib
import sys
import threading
import time
import traceback

from rocketmq import (ClientConfiguration, ConsumeResult, Credentials,
                      FilterExpression, Message, MessageListener, Producer,
                      PushConsumer, SimpleConsumer, TransactionChecker,
                      TransactionResolution)
from sdkutil import Cli, Fail, bounded, die, err_text, expect, log, run_id

# A SimpleConsumer's long polling (seconds): its receive() returns at the latest after this, and
# its gRPC deadline is request_timeout (3 s) + this.
AWAIT = 5
RECEIVE_BOUND = AWAIT + 3 + 10
CLIENT_BOUND = 25  # startup (a PushConsumer waits up to 10 s for Settings) and shutdown


class Env:
    def __init__(self, args):
        self.access_point = args.access_point
        self.cli = Cli(args.bin, args.namesrv)
        self.data_dir = args.data_dir
        self.run = run_id()
        self.state = {}

    def name(self, kind):
        return f"sdk-{kind}-{self.run}"

    def config(self):
        return ClientConfiguration(self.access_point, Credentials())


@contextlib.contextmanager
def running(client, what):
    """startup() bounded; shutdown() at the end of the step whatever happens."""
    try:
        bounded(CLIENT_BOUND, f"{what}.startup()", client.startup)
    except Fail:
        raise
    except Exception as e:
        hint = ""
        if "NoneType" in str(e) and "shutdown" in str(e):
            hint = (" (the SDK's mask for a PushConsumer that got no Settings reply with status OK "
                    "on its Telemetry stream within 10 s)")
        raise Fail(f"{what}.startup() to succeed, got {err(e)}{hint}")
    try:
        yield client
    except BaseException:
        try:
            bounded(CLIENT_BOUND, f"{what}.shutdown()", client.shutdown)
        except Exception as e:
            log(f"  ({what}.shutdown() failed too: {err(e)})")
        raise
    else:
        try:
            bounded(CLIENT_BOUND, f"{what}.shutdown()", client.shutdown)
        except Fail:
            raise
        except Exception as e:
            raise Fail(f"{what}.shutdown() to succeed, got {err(e)}")


def err(e):
    """An exception as `Type: text` on one line, with the status code's name when the SDK gives a code."""
    text = err_text(e)
    code = getattr(e, "code", None)
    if isinstance(code, int):
        try:
            from rocketmq.grpc_protocol import Code  # only to name the code
            text += f" [{Code.Name(code)}]"
        except ValueError:
            pass
    return text


def new_message(topic, body, tag=None, key=None, props=None, group=None, deliver_at=None):
    m = Message()
    m.topic = topic
    m.body = body.encode("utf-8")
    if tag:
        m.tag = tag
    if key:
        m.keys = key
    for k, v in (props or {}).items():
        m.add_property(k, v)
    if group:
        m.message_group = group
    if deliver_at:
        m.delivery_timestamp = deliver_at
    return m


def send(producer, msg, what, transaction=None):
    try:
        if transaction is None:
            receipt = bounded(30, what, producer.send, msg)
        else:
            receipt = bounded(30, what, producer.send, msg, transaction)
    except Fail:
        raise
    except Exception as e:
        raise Fail(f"{what} to return a receipt, got {err(e)}")
    expect(receipt is not None and receipt.message_id,
           f"{what}: a receipt with a message id, got {receipt!r}")
    return receipt


def receive(consumer, max_n, invisible, what="receive"):
    try:
        got = bounded(RECEIVE_BOUND, what, consumer.receive, max_n, invisible)
    except Fail:
        raise
    except Exception as e:
        raise Fail(f"{what} to return messages or none, got {err(e)}")
    return got or []


def ack(consumer, msg, what="ack"):
    try:
        bounded(15, what, consumer.ack, msg)
    except Fail:
        raise
    except Exception as e:
        raise Fail(f"{what} of {msg.message_id} to succeed, got {err(e)}")


def describe(m):
    return (f"id {m.message_id} tag {m.tag} keys {sorted(m.keys)} group {m.message_group} "
            f"attempt {m.delivery_attempt} body {m.body[:40]!r}")


def simple_consumer(env, group, topic, tag="*"):
    return SimpleConsumer(env.config(), group, {topic: FilterExpression(tag)}, await_duration=AWAIT)


# ---------------------------------------------------------------------------------------------

def step_producer_normal(env):
    topic, group = env.name("normal"), env.name("simple")
    env.cli.create_topic(topic, "normal")
    env.cli.config_group(group)  # before producing: the group exists when the messages arrive
    sent = {}  # message id -> (seq, tag, key, body)
    echoed = 0
    with running(Producer(env.config(), (topic,)), "Producer") as producer:
        for i in range(7):
            tag = "tagA" if i < 5 else "tagB"
            key = f"key-{env.run}-{i}"
            body = f"normal {i} of run {env.run}"
            msg = new_message(topic, body, tag=tag, key=key, props={"seq": str(i), "run": env.run})
            r = send(producer, msg, f"send of message {i}")
            expect(r.message_id not in sent, f"distinct message ids, got {r.message_id} twice")
            echoed += r.message_id == msg.message_id
            sent[r.message_id] = (i, tag, key, body)
    env.state["normal"] = (topic, group, sent)
    ids = "the ids the SDK made (echoed)" if echoed == 7 else f"{7 - echoed} server-assigned id(s)"
    return f"7 sent to {topic} (5 tagA, 2 tagB), 7 distinct message ids, {ids}"


def step_simple_consumer(env):
    expect("normal" in env.state, "producer_normal to have run first")
    topic, group, sent = env.state["normal"]
    want = {mid: v for mid, v in sent.items() if v[1] == "tagA"}
    got = {}
    attempts = []
    with running(simple_consumer(env, group, topic, "tagA"), "SimpleConsumer") as consumer:
        deadline = time.monotonic() + 30
        while len(got) < len(want):
            expect(time.monotonic() < deadline,
                   f"all {len(want)} tagA messages within 30 s, got {len(got)}: missing ids "
                   f"{sorted(set(want) - set(got))}")
            for m in receive(consumer, 16, 20):
                expect(m.message_id in want,
                       f"only the tagA messages sent (ids {sorted(want)}), got {describe(m)}")
                expect(m.message_id not in got, f"each message once before its ack, got {describe(m)} again")
                seq, tag, key, body = want[m.message_id]
                expect(m.topic == topic, f"topic {topic}, got {m.topic}")
                expect(m.body == body.encode(), f"body {body!r}, got {m.body!r}")
                expect(m.tag == tag, f"tag {tag}, got {m.tag}")
                expect(set(m.keys) == {key}, f"keys {{{key}}}, got {set(m.keys)}")
                props = dict(m.properties)
                expect(props.get("seq") == str(seq) and props.get("run") == env.run,
                       f"user properties seq={seq} run={env.run}, got {props}")
                expect(m.delivery_attempt is not None and m.delivery_attempt >= 1,
                       f"delivery_attempt >= 1, got {m.delivery_attempt}")
                expect(m.receipt_handle, f"a receipt handle, got {m.receipt_handle!r}")
                attempts.append(m.delivery_attempt)
                got[m.message_id] = m
                ack(consumer, m)
        again = receive(consumer, 16, 20, "a receive after the acks")
        expect(not again, f"no message after all were acked, got {[describe(m) for m in again]}")
    return (f"{len(got)} tagA messages received with body, tag, key, properties and the producer's "
            f"ids (delivery_attempt {sorted(set(attempts))}), acked; tagB filtered out; "
            f"a later {AWAIT} s receive got none")


def one_message_topic(env, kind, tag):
    topic, group = env.name(kind), env.name(kind + "-g")
    env.cli.create_topic(topic, "normal")
    env.cli.config_group(group)
    with running(Producer(env.config(), (topic,)), "Producer") as producer:
        r = send(producer, new_message(topic, f"{kind} {env.run}", tag=tag), "send")
    return topic, group, r.message_id


def receive_one(consumer, mid, invisible, within, what):
    """Receives until message `mid` arrives; anything else fails. Returns (message, time)."""
    deadline = time.monotonic() + within
    while True:
        expect(time.monotonic() < deadline, f"{what} within {within} s, got nothing")
        for m in receive(consumer, 16, invisible):
            expect(m.message_id == mid, f"{what} (id {mid}), got {describe(m)}")
            return m, time.monotonic()


def step_change_invisible(env):
    topic, group, mid = one_message_topic(env, "civ", "civ")
    with running(simple_consumer(env, group, topic), "SimpleConsumer") as consumer:
        m, t0 = receive_one(consumer, mid, 3, 20, "the message")
        first_handle = m.receipt_handle
        try:
            bounded(15, "change_invisible_duration", consumer.change_invisible_duration, m, 30)
        except Fail:
            raise
        except Exception as e:
            raise Fail(f"change_invisible_duration(msg, 30) to succeed, got {err(e)}")
        expect(m.receipt_handle, f"change_invisible_duration to leave a receipt handle, got {m.receipt_handle!r}")
        # This receive long-polls AWAIT (5) s, past the original 3 s invisibility.
        again = receive(consumer, 16, 30, "a receive past the original invisible time")
        waited = time.monotonic() - t0
        expect(not again,
               f"the message to stay invisible for 30 s after change_invisible_duration, got "
               f"{[describe(x) for x in again]} {waited:.1f} s after the first receive")
        expect(waited > 3, f"the check receive to outlast the original 3 s, it returned after {waited:.1f} s")
        ack(consumer, m, "ack with the handle change_invisible_duration returned")
    changed = "a new handle" if m.receipt_handle != first_handle else "the same handle"
    return (f"received with invisible 3 s, changed to 30 s ({changed}): still invisible "
            f"{waited:.1f} s later; acked with the returned handle")


def step_redelivery(env):
    topic, group, mid = one_message_topic(env, "redeliver", "redeliver")
    with running(simple_consumer(env, group, topic), "SimpleConsumer") as consumer:
        m1, t1 = receive_one(consumer, mid, 2, 20, "the message")
        a1 = m1.delivery_attempt
        expect(a1 is not None and a1 >= 1, f"delivery_attempt >= 1, got {a1}")
        m2, t2 = receive_one(consumer, mid, 2, 20, "the unacked message again after 2 s")
        a2 = m2.delivery_attempt
        expect(t2 - t1 >= 1.5, f"no redelivery before the 2 s invisible time ran out, got it after {t2 - t1:.2f} s")
        expect(a2 is not None and a2 > a1, f"a higher delivery_attempt than {a1} on redelivery, got {a2}")
        ack(consumer, m2, "ack with the redelivery's handle")
        again = receive(consumer, 16, 2, "a receive after the ack")
        expect(not again, f"nothing after the ack, got {[describe(x) for x in again]}")
    return (f"not acked, came back {t2 - t1:.1f} s later with the same id, delivery_attempt {a1} -> {a2}; "
            f"acked with the new handle, then none")


def fifo_send(env, producer, topic, per_group):
    """g1-0, g2-0, g1-1, g2-1, ...: returns {group: [message ids in send order]}."""
    order = {"g1": [], "g2": []}
    for i in range(per_group):
        for g in ("g1", "g2"):
            r = send(producer, new_message(topic, f"{g}-{i} {env.run}", tag="fifo", group=g),
                     f"send of {g}-{i}")
            order[g].append(r.message_id)
    return order


def describe_ids(msgs, order):
    """Messages as the names fifo_send gave them (g1-0, g2-0, ...)."""
    names = {mid: f"{g}-{i}" for g, ids in order.items() for i, mid in enumerate(ids)}
    return ", ".join(names.get(m.message_id, m.message_id) for m in msgs)


def check_group_order(order, seen, what):
    """seen: [(message group, id)] in consumption order (first deliveries)."""
    for g, ids in order.items():
        got = [mid for grp, mid in seen if grp == g]
        names = {mid: f"{g}-{i}" for i, mid in enumerate(ids)}
        expect(got == ids,
               f"{what}: message group {g} in send order {[names[x] for x in ids]}, got "
               f"{[names.get(x, x) for x in got]}")


def step_fifo(env):
    topic, group = env.name("fifo"), env.name("fifo-g")
    env.cli.create_topic(topic, "fifo")
    env.cli.config_group(group, fifo=True)
    with running(Producer(env.config(), (topic,)), "Producer") as producer:
        order = fifo_send(env, producer, topic, 4)
    group_of = {mid: g for g, ids in order.items() for mid in ids}
    total = len(group_of)
    seen = []
    blocked_check = "no blocking check (the first receive returned all 8)"
    with running(simple_consumer(env, group, topic), "SimpleConsumer") as consumer:
        deadline = time.monotonic() + 20
        first = []
        while not first:
            expect(time.monotonic() < deadline, "FIFO messages within 20 s, got none")
            # One message only: the next receive then runs while a message of its group is unacked.
            first = receive(consumer, 1, 20, "the first receive (max 1 message)")
        for m in first:
            expect(m.message_id in group_of, f"one of the 8 sent, got {describe(m)}")
            expect(m.message_group == group_of[m.message_id],
                   f"message_group {group_of[m.message_id]}, got {describe(m)}")
        in_flight = {group_of[m.message_id] for m in first}
        if len(first) < total:
            # Nothing acked yet: no later message of a group with one in flight may come.
            second = receive(consumer, 32, 20, "a receive while the first batch is unacked")
            for m in second:
                expect(m.message_id in group_of, f"one of the 8 sent, got {describe(m)}")
                expect(group_of[m.message_id] not in in_flight,
                       f"no message of group {group_of[m.message_id]} while an earlier one is unacked, "
                       f"got {describe(m)}")
            blocked_check = (f"while {describe_ids(first, order)} was unacked a receive got "
                             f"{describe_ids(second, order) or 'nothing'}")
            first = first + second
        batch = first
        while True:
            for m in batch:
                expect(m.message_id in group_of, f"one of the 8 sent, got {describe(m)}")
                expect(m.message_id not in {x for _, x in seen}, f"each message once, got {describe(m)} again")
                seen.append((group_of[m.message_id], m.message_id))
                ack(consumer, m)
            if len(seen) == total:
                break
            expect(time.monotonic() < deadline,
                   f"all {total} FIFO messages within 20 s, got {len(seen)}")
            batch = receive(consumer, 32, 20)
    check_group_order(order, seen, "SimpleConsumer on a FIFO group")
    return f"8 messages of groups g1/g2 each in send order; {blocked_check}"


def step_delay(env):
    topic, group = env.name("delay"), env.name("delay-g")
    env.cli.create_topic(topic, "delay")
    env.cli.config_group(group)
    with running(simple_consumer(env, group, topic), "SimpleConsumer") as consumer:
        with running(Producer(env.config(), (topic,)), "Producer") as producer:
            deliver_at = int(time.time()) + 3
            t_send = time.time()
            r = send(producer, new_message(topic, f"delay {env.run}", tag="delay", deliver_at=deliver_at),
                     "send of a message with delivery_timestamp now + 3 s")
        deadline = time.monotonic() + (deliver_at - time.time()) + 15
        got = None
        while got is None:
            expect(time.monotonic() < deadline,
                   f"the delayed message within 15 s after its delivery time {deliver_at}, got nothing")
            for m in receive(consumer, 16, 20):
                t = time.time()
                expect(m.message_id == r.message_id, f"the delayed message (id {r.message_id}), got {describe(m)}")
                expect(t >= deliver_at - 0.1,
                       f"nothing before the delivery time {deliver_at}, got it at {t:.2f} "
                       f"({deliver_at - t:.2f} s early, {t - t_send:.2f} s after the send)")
                got, t_recv = m, t
        ack(consumer, got)
    late = t_recv - deliver_at
    expect(late <= 10, f"the delayed message within 10 s of its delivery time, got it {late:.1f} s late")
    return (f"sent with delivery_timestamp +{deliver_at - t_send:.2f} s, received "
            f"{t_recv - t_send:.2f} s after the send ({late:.2f} s after the delivery time; "
            f"message.delivery_timestamp {got.delivery_timestamp} ms)")


class RecordingChecker(TransactionChecker):
    """Answers every check-back with COMMIT and records what it was asked about."""

    def __init__(self):
        self.lock = threading.Lock()
        self.checked = []  # (message id, topic, body, time)

    def check(self, message: Message) -> TransactionResolution:
        with self.lock:
            self.checked.append((message.message_id, message.topic, message.body, time.monotonic()))
        return TransactionResolution.COMMIT


def step_transaction(env):
    topic, group = env.name("tx"), env.name("tx-g")
    env.cli.create_topic(topic, "transaction")
    env.cli.config_group(group)
    checker = RecordingChecker()
    bodies = {}
    with running(simple_consumer(env, group, topic), "SimpleConsumer") as consumer:
        # As the SDK's transaction example: Producer(config, (topic,), checker=...), then per
        # transaction begin_transaction(), send(msg, transaction), commit() / rollback().
        with running(Producer(env.config(), (topic,), checker=checker), "transactional Producer") as producer:
            receipts = {}
            for outcome in ("commit", "rollback", "unknown"):
                transaction = producer.begin_transaction()
                body = f"tx {outcome} {env.run}"
                msg = new_message(topic, body, tag="tx", key=f"tx-{outcome}-{env.run}")
                r = send(producer, msg, f"send of the half message to {outcome}", transaction)
                expect(r.transaction_id, f"a transaction id in the {outcome} half's receipt, got {r.transaction_id!r}")
                receipts[outcome] = r
                bodies[r.message_id] = body
                try:
                    if outcome == "commit":
                        bounded(15, "transaction.commit()", transaction.commit)
                    elif outcome == "rollback":
                        bounded(15, "transaction.rollback()", transaction.rollback)
                except Fail:
                    raise
                except Exception as e:
                    raise Fail(f"transaction.{outcome}() to succeed, got {err(e)}")
            t_sent = time.monotonic()
            want = {receipts["commit"].message_id: "commit", receipts["unknown"].message_id: "unknown"}
            rolled_back = receipts["rollback"].message_id
            got = {}
            deadline = time.monotonic() + 40
            while len(got) < len(want):
                expect(time.monotonic() < deadline,
                       f"the committed and the checked-back transactions' messages within 40 s, got "
                       f"{sorted(want[x] for x in got)}; check-backs seen: {len(checker.checked)}")
                for m in receive(consumer, 16, 20):
                    expect(m.message_id != rolled_back, f"the rolled-back message never, got {describe(m)}")
                    expect(m.message_id in want, f"one of the transactions' messages, got {describe(m)}")
                    expect(m.body == bodies[m.message_id].encode(), f"body {bodies[m.message_id]!r}, got {m.body!r}")
                    expect(m.message_id not in got, f"each committed message once, got {describe(m)} again")
                    got[m.message_id] = time.monotonic()
                    ack(consumer, m)
            # The producer (and its Telemetry stream, which carries the check-backs) stays up until here.
        again = receive(consumer, 16, 20, "a receive after both were acked")
        expect(not again, f"nothing more (the rolled-back one never), got {[describe(m) for m in again]}")
    unknown = receipts["unknown"].message_id
    checks = [c for c in checker.checked if c[0] == unknown]
    expect(checks, f"a check-back for the unresolved transaction {unknown} before it became visible, got "
                   f"check-backs for {[c[0] for c in checker.checked]}")
    expect(checks[0][1] == topic and checks[0][2] == bodies[unknown].encode(),
           f"the check-back's message to carry topic {topic} and the body, got {checks[0][1]} {checks[0][2]!r}")
    expect(checks[0][3] <= got[unknown],
           "the unresolved transaction's message to become visible only after the checker answered COMMIT")
    others = len(checker.checked) - len(checks)
    return (f"commit received, rollback never, unknown checked back {len(checks)}x "
            f"({checks[0][3] - t_sent:.1f} s after the sends) and received "
            f"{got[unknown] - t_sent:.1f} s after the sends"
            + (f"; {others} check-back(s) about the ended ones" if others else ""))


class Recorder(MessageListener):
    """Records each delivery; answers `result`."""

    def __init__(self, result=ConsumeResult.SUCCESS, pause=0.0):
        self.result = result
        self.pause = pause
        self.lock = threading.Lock()
        self.deliveries = []  # (message id, message group, delivery attempt, time)

    def consume(self, message: Message) -> ConsumeResult:
        if self.pause:
            time.sleep(self.pause)
        with self.lock:
            self.deliveries.append((message.message_id, message.message_group, message.delivery_attempt,
                                    time.monotonic()))
        return self.result

    def snapshot(self):
        with self.lock:
            return list(self.deliveries)


def wait_for(cond, within, what):
    deadline = time.monotonic() + within
    while not cond():
        expect(time.monotonic() < deadline, what)
        time.sleep(0.1)


def step_push_concurrent(env):
    topic, group = env.name("push"), env.name("push-g")
    env.cli.create_topic(topic, "normal")
    env.cli.config_group(group)
    listener = Recorder()
    n = 20
    with running(PushConsumer(env.config(), group, listener, {topic: FilterExpression()}), "PushConsumer"):
        with running(Producer(env.config(), (topic,)), "Producer") as producer:
            ids = [send(producer, new_message(topic, f"push {i} {env.run}", tag="push"), f"send {i}").message_id
                   for i in range(n)]
        t0 = time.monotonic()
        wait_for(lambda: {d[0] for d in listener.snapshot()} >= set(ids), 30,
                 f"the PushConsumer to consume all {n} within 30 s, it consumed "
                 f"{len({d[0] for d in listener.snapshot()} & set(ids))}")
        took = time.monotonic() - t0
        time.sleep(0.5)  # a duplicate right behind the last one would show here
        seen = listener.snapshot()
    extra = [d for d in seen if d[0] not in set(ids)]
    expect(not extra, f"only the {n} sent, got {extra}")
    counts = {}
    for d in seen:
        counts[d[0]] = counts.get(d[0], 0) + 1
    twice = {k: v for k, v in counts.items() if v > 1}
    expect(not twice, f"each message consumed once (listener returned SUCCESS), got repeats {twice}")
    return f"{n} consumed once each by the listener, {took:.1f} s after the last send"


def step_push_fifo(env):
    topic, group = env.name("pushfifo"), env.name("pushfifo-g")
    env.cli.create_topic(topic, "fifo")
    env.cli.config_group(group, fifo=True)
    listener = Recorder(pause=0.01)
    with running(PushConsumer(env.config(), group, listener, {topic: FilterExpression()}), "PushConsumer") as consumer:
        with running(Producer(env.config(), (topic,)), "Producer") as producer:
            order = fifo_send(env, producer, topic, 5)
        all_ids = {mid for ids in order.values() for mid in ids}
        wait_for(lambda: {d[0] for d in listener.snapshot()} >= all_ids, 30,
                 f"the FIFO PushConsumer to consume all 10 within 30 s, it consumed "
                 f"{len({d[0] for d in listener.snapshot()} & all_ids)}")
        fifo_mode = consumer.fifo
        seen = listener.snapshot()
    first = []
    for mid, grp, _, _ in seen:
        expect(mid in all_ids, f"only the 10 sent, got {mid}")
        if mid not in {x for _, x in first}:
            first.append((grp, mid))
    try:
        check_group_order(order, first, "PushConsumer on a FIFO group")
    except Fail as e:
        if not fifo_mode:
            raise Fail(f"{e} (the PushConsumer is not in FIFO mode: the server's Settings reply had "
                       f"subscription.fifo false)")
        raise
    repeats = len(seen) - len(first)
    expect(repeats == 0, f"each message consumed once, got {repeats} repeat(s)")
    return f"10 messages of groups g1/g2 each consumed in send order (SDK FIFO mode {fifo_mode})"


def step_retry_dlq(env):
    topic, group = env.name("retry"), env.name("retry-g")
    env.cli.create_topic(topic, "normal")
    env.cli.config_group(group, max_retries=2, retry_delays_ms=[1000])
    listener = Recorder(result=ConsumeResult.FAILURE)
    with running(PushConsumer(env.config(), group, listener, {topic: FilterExpression()}), "PushConsumer"):
        with running(Producer(env.config(), (topic,)), "Producer") as producer:
            mid = send(producer, new_message(topic, f"retry {env.run}", tag="retry"), "send").message_id
        t0 = time.monotonic()
        deadline = t0 + 45
        dlq_output = ""
        while True:
            ids, dlq_output = env.cli.dead_letter_ids(group)
            if mid in ids:
                break
            expect(time.monotonic() < deadline,
                   f"message {mid} in %DLQ%{group} within 45 s (after {len(listener.snapshot())} "
                   f"failed deliveries), `admin dlq list` shows: {dlq_output.strip()[-600:]}")
            time.sleep(1)
        t_dlq = time.monotonic() - t0
        at_dlq = len(listener.snapshot())
        time.sleep(2.5)  # more than the 1 s retry delay: a delivery after the DLQ would show
        seen = listener.snapshot()
    ours = [d for d in seen if d[0] == mid]
    expect(len(ours) == len(seen), f"only message {mid} delivered, got {seen}")
    attempts = [d[2] for d in ours]
    expect(len(ours) > 1, f"the failed message redelivered (more than 1 delivery), got {len(ours)}")
    expect(attempts == sorted(attempts) and len(set(attempts)) == len(attempts),
           f"delivery_attempt rising with each delivery, got {attempts}")
    expect(len(seen) == at_dlq,
           f"no delivery after it reached the DLQ, got {len(seen) - at_dlq} more (attempts {attempts})")
    note = "" if len(ours) == 3 else " (RocketMQ would make 3: 1 + --max-retries 2)"
    return (f"delivered {len(ours)}x (delivery_attempt {attempts}){note}, in the DLQ "
            f"{t_dlq:.1f} s after the send, then no more")


def expect_refused(what, fn, within):
    t0 = time.monotonic()
    try:
        r = bounded(within, what, fn)
    except Fail:
        raise
    except Exception as e:
        return f"{err(e)[:140]} after {time.monotonic() - t0:.1f} s"
    raise Fail(f"{what} to raise, it returned {r}")


def step_bad_input(env):
    fifo_topic, normal_topic = env.name("bad-fifo"), env.name("bad")
    env.cli.create_topic(fifo_topic, "fifo")
    env.cli.create_topic(normal_topic, "normal")
    results = []
    with running(Producer(env.config()), "Producer") as producer:
        # Controls: the same producer can send to both topics, so a refusal below is about the input.
        send(producer, new_message(normal_topic, "control"), "send of a good NORMAL message (control)")
        send(producer, new_message(fifo_topic, "control", group="g1"), "send of a good FIFO message (control)")
        missing = env.name("missing")
        t0 = time.monotonic()
        try:
            r = bounded(30, "send to a topic that does not exist", producer.send,
                        new_message(missing, "to nowhere"))
            results.append(f"missing topic: auto-created ({r.message_id}), as dev's auto-create allows")
        except Fail:
            raise
        except Exception as e:
            results.append(f"missing topic: {err(e)[:120]} after {time.monotonic() - t0:.1f} s")
        # 4 MiB is both the SDK's default limit and raftmq's max body size; the server's Settings
        # reply may lower the SDK's, which then refuses before sending.
        big = Message()
        big.topic = normal_topic
        big.body = b"x" * (4 * 1024 * 1024 + 1)
        results.append("body 4 MiB + 1: " + expect_refused("send of a 4 MiB + 1 byte body", lambda: producer.send(big), 60))
        long_topic = "t" * 200  # matches the SDK's name pattern; RocketMQ allows at most 127 characters
        results.append("200-char topic: " + expect_refused(
            "send to a 200-character topic", lambda: producer.send(new_message(long_topic, "long")), 30))
        results.append("NORMAL to FIFO topic: " + expect_refused(
            "send of a NORMAL message to a FIFO topic",
            lambda: producer.send(new_message(fifo_topic, "not fifo")), 30))
    return "; ".join(results)


STEPS = [
    ("producer_normal", step_producer_normal),
    ("simple_consumer", step_simple_consumer),
    ("change_invisible", step_change_invisible),
    ("redelivery", step_redelivery),
    ("fifo", step_fifo),
    ("delay", step_delay),
    ("transaction", step_transaction),
    ("push_concurrent", step_push_concurrent),
    ("push_fifo", step_push_fifo),
    ("retry_dlq", step_retry_dlq),
    ("bad_input", step_bad_input),
]

# Past this many seconds the remaining steps are not started (the whole run is to stay < 3 min).
BUDGET = 170


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--access-point", required=True, help="a broker node's client address HOST:PORT")
    p.add_argument("--namesrv", required=True, help="NameServer HOST:PORT, for the raftmq admin CLI")
    p.add_argument("--bin", required=True, help="the raftmq binary")
    p.add_argument("--data-dir", default="", help="the `raftmq dev` data dir (named in failures)")
    p.add_argument("--steps", default="", help="comma-separated subset of: " + ",".join(n for n, _ in STEPS))
    p.add_argument("--fail-fast", action="store_true", help="stop at the first failed step")
    args = p.parse_args()
    chosen = [s for s in args.steps.split(",") if s] or [n for n, _ in STEPS]
    unknown = set(chosen) - {n for n, _ in STEPS}
    if unknown:
        p.error(f"unknown step(s) {sorted(unknown)}")
    env = Env(args)
    log(f"sdk_test: run {env.run}, access point {env.access_point}, NameServer {args.namesrv}")
    started = time.monotonic()
    failed = []
    for name, fn in STEPS:
        if name not in chosen:
            continue
        if time.monotonic() - started > BUDGET:
            log(f"FAIL {name}: not started, the run is past its {BUDGET} s budget")
            failed.append(name)
            continue
        t0 = time.monotonic()
        try:
            summary = fn(env)
            log(f"ok {name} {summary}  [{time.monotonic() - t0:.1f}s]")
        except Fail as e:
            log(f"FAIL {name}: expected {e}  [{time.monotonic() - t0:.1f}s]")
            failed.append(name)
        except Exception as e:
            log(f"FAIL {name}: unexpected {err(e)}  [{time.monotonic() - t0:.1f}s]")
            traceback.print_exc(file=sys.stderr)
            failed.append(name)
        if failed and args.fail_fast:
            break
    took = time.monotonic() - started
    if failed:
        where = f"; replica logs under {args.data_dir}" if args.data_dir else ""
        log(f"sdk_test: {len(failed)} of {len(chosen)} steps FAILED ({', '.join(failed)}) in {took:.1f}s{where}")
        die(1)
    log(f"sdk_test: all {len(chosen)} steps ok in {took:.1f}s")
    die(0)


if __name__ == "__main__":
    main()

"""The official RocketMQ 5 Python SDK through a leader failover of raftmq's broker group.

    python failover.py --nodes 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT --namesrv HOST:PORT \
                       --bin RAFTMQ --data-dir DEV_DATA_DIR [--count 3000] [--inflight 16]
                       [--access-point HOST:PORT] [--kill-at 0.33] [--invisible 10]

Run by scripts/rocketmq-python-sdk-test.sh after sdk_test.py, on the same `raftmq dev` cluster.
A Producer sends --count messages (--inflight at a time, via send_async; a 0.1 s pause after each
new failure, as an application would back off) to a fresh topic while a SimpleConsumer of a fresh
group receives them 32 at a time and acks each batch (in parallel) before receiving more. When a
third of the sends have succeeded, the group's leader (`raftmq admin cluster`) is SIGKILLed once,
by the pid in DEV_DATA_DIR/<group>-<node>.pid (`raftmq dev` restarts it 3 s later). Then the
consumer drains until every acknowledged send was received and acked (or its ack failed and it
did not come back within --invisible + 3 s), and keeps receiving until --invisible + 3 s after the
last successful ack (an acked message whose pop state was lost would come back in that time).

Asserts: some send issued after the kill succeeds (the group recovered); every message whose send
succeeded is received (none lost); no message id is delivered after its ack succeeded. Prints:
sent ok, send failures (the SDK's 3 attempts exhausted), received, acked, redelivered before their
ack, the time from the kill to the first successful send issued after it, the longest pause
between successful sends, and the commonest send / receive / ack errors.

The access point defaults to a node that is not the leader at the start, so the kill hits the
route's broker endpoints and not QueryRoute; --access-point overrides it.
"""

import argparse
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor, wait

from rocketmq import (ClientConfiguration, Credentials, FilterExpression,
                      Message, Producer, SimpleConsumer)
from sdkutil import Cli, Fail, bounded, die, err_text, expect, log, run_id

AWAIT = 5


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        # producer
        self.issued = 0
        self.ok = {}  # message id -> (issued at, done at)
        self.send_failures = []  # (issued at, done at, error)
        self.outstanding = 0
        # consumer
        self.deliveries = 0
        self.received = set()
        self.acked = set()
        self.ack_failures = []  # (time, message id, error)
        self.redelivered_before_ack = 0
        self.after_ack = []  # (message id, delivery attempt, time)
        self.receive_errors = []  # (time, error)
        self.last_ack = None
        self.last_delivery = {}  # message id -> time


def leader_now(cli, within=20):
    deadline = time.monotonic() + within
    while True:
        try:
            group, leader, nodes = cli.cluster()
            if leader is not None:
                return group, leader, nodes
            last = "no leader"
        except Fail as e:
            last = str(e)
        expect(time.monotonic() < deadline, f"the broker group to have a leader within {within} s, got: {last}")
        time.sleep(0.2)


def consume_loop(consumer, stats, stop, invisible, ack_pool):
    def do_ack(m):
        try:
            bounded(15, "ack", consumer.ack, m)
        except Exception as e:
            with stats.lock:
                stats.ack_failures.append((time.monotonic(), m.message_id, err_text(e)))
            return
        with stats.lock:
            stats.acked.add(m.message_id)
            stats.last_ack = time.monotonic()

    while not stop.is_set():
        try:
            msgs = bounded(AWAIT + 3 + 10, "receive", consumer.receive, 32, invisible) or []
        except Exception as e:
            with stats.lock:
                stats.receive_errors.append((time.monotonic(), err_text(e)))
            stop.wait(0.2)
            continue
        now = time.monotonic()
        with stats.lock:
            for m in msgs:
                stats.deliveries += 1
                mid = m.message_id
                if mid in stats.acked:
                    stats.after_ack.append((mid, m.delivery_attempt, now))
                elif mid in stats.received:
                    stats.redelivered_before_ack += 1
                stats.received.add(mid)
                stats.last_delivery[mid] = now
        # Ack the batch (in parallel) before receiving more, as an application that processes what
        # it got would: acks never queue up behind the invisible time.
        wait([ack_pool.submit(do_ack, m) for m in msgs], timeout=30)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", required=True, help="NODE=HOST:PORT,... as `raftmq dev` printed them")
    p.add_argument("--namesrv", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--data-dir", required=True, help="the `raftmq dev` --data-dir (holds <group>-<node>.pid)")
    p.add_argument("--access-point", default="", help="default: a node that is not the leader at the start")
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--kill-at", type=float, default=0.33, help="kill once this share of sends succeeded")
    p.add_argument("--invisible", type=int, default=10, help="the consumer's invisible duration (s)")
    p.add_argument("--drain-secs", type=int, default=60)
    p.add_argument("--send-secs", type=int, default=60, help="stop issuing sends after this long")
    args = p.parse_args()

    cli = Cli(args.bin, args.namesrv)
    nodes = {}
    for item in args.nodes.split(","):
        node, endpoint = item.split("=", 1)
        nodes[int(node)] = endpoint
    run = run_id()
    topic, cgroup = f"sdk-failover-{run}", f"sdk-failover-g-{run}"

    try:
        group, leader, _ = leader_now(cli)
        access = args.access_point or next(e for n, e in sorted(nodes.items()) if n != leader)
        log(f"failover: run {run}, broker group {group} leader node {leader}, access point {access}, "
            f"{args.count} messages, {args.inflight} in flight")
        cli.create_topic(topic, "normal")
        cli.config_group(cgroup)
        config = ClientConfiguration(access, Credentials())
        stats = Stats()
        stop = threading.Event()
        ack_pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="ack")

        consumer = SimpleConsumer(config, cgroup, {topic: FilterExpression()}, await_duration=AWAIT)
        bounded(25, "SimpleConsumer.startup()", consumer.startup)
        consumer_thread = threading.Thread(
            target=consume_loop, args=(consumer, stats, stop, args.invisible, ack_pool), daemon=True)
        consumer_thread.start()

        producer = Producer(ClientConfiguration(access, Credentials()), (topic,))
        bounded(25, "Producer.startup()", producer.startup)
        slots = threading.Semaphore(args.inflight)
        kill = {}
        kill_threshold = max(1, int(args.count * args.kill_at))

        def on_done(issued, future):
            done = time.monotonic()
            try:
                r = future.result()
                with stats.lock:
                    stats.ok[r.message_id] = (issued, done)
            except Exception as e:
                with stats.lock:
                    stats.send_failures.append((issued, done, err_text(e)))
            finally:
                with stats.lock:
                    stats.outstanding -= 1
                slots.release()

        t_start = time.monotonic()
        send_deadline = t_start + args.send_secs
        seen_failures = 0
        for i in range(args.count):
            if time.monotonic() >= send_deadline:
                log(f"failover: stopped issuing after {i} sends: the {args.send_secs} s send phase is over")
                break
            # Like an application, back off a little while sends fail (the SDK retries at once, so
            # an outage would otherwise use up the remaining messages within milliseconds).
            if len(stats.send_failures) > seen_failures:
                seen_failures = len(stats.send_failures)
                time.sleep(0.1)
            expect(kill or stats.ok or len(stats.send_failures) < 50,
                   f"the producer to work before the kill, its first {len(stats.send_failures)} sends failed, "
                   f"e.g. {stats.send_failures[0][2] if stats.send_failures else '-'}")
            expect(slots.acquire(timeout=60), f"a send slot within 60 s (sends stuck: {stats.outstanding} outstanding)")
            m = Message()
            m.topic = topic
            m.body = f"failover {i} {run}".encode()
            m.keys = f"fo-{run}-{i}"
            issued = time.monotonic()
            with stats.lock:
                stats.issued += 1
                stats.outstanding += 1
            try:
                fut = producer.send_async(m)
            except Exception as e:
                with stats.lock:
                    stats.send_failures.append((issued, time.monotonic(), err_text(e)))
                    stats.outstanding -= 1
                slots.release()
                continue
            fut.add_done_callback(lambda f, issued=issued: on_done(issued, f))
            if not kill and len(stats.ok) >= kill_threshold:
                g, victim, _ = leader_now(cli)
                pid_file = os.path.join(args.data_dir, f"{g}-{victim}.pid")
                with open(pid_file) as f:
                    pid = int(f.read().strip())
                os.kill(pid, signal.SIGKILL)
                kill.update(t=time.monotonic(), node=victim, pid=pid, at_ok=len(stats.ok))
                log(f"failover: SIGKILL leader node {victim} (pid {pid}) after {len(stats.ok)} acknowledged sends, "
                    f"{time.monotonic() - t_start:.1f} s in")
        deadline = time.monotonic() + 60
        while True:
            with stats.lock:
                outstanding = stats.outstanding
            if outstanding == 0:
                break
            expect(time.monotonic() < deadline, f"every send to finish within 60 s, {outstanding} still outstanding")
            time.sleep(0.05)
        t_sent = time.monotonic()
        bounded(25, "Producer.shutdown()", producer.shutdown)
        expect(kill, f"the kill to happen after {kill_threshold} acknowledged sends, only {len(stats.ok)} succeeded "
                     f"(failures: {stats.send_failures[:3]})")
        expect(any(issued >= kill["t"] for issued, _ in stats.ok.values()),
               f"the group to accept sends again after the kill: none of the "
               f"{sum(1 for _, d, _ in stats.send_failures if d >= kill['t'])} sends failing after it succeeded "
               f"(e.g. {stats.send_failures[-1][2][:160] if stats.send_failures else '-'})")
        log(f"failover: sends done in {t_sent - t_start:.1f} s: {len(stats.ok)} ok, {len(stats.send_failures)} failed; draining")

        # Drain: every acknowledged send received, and each acked or, if its ack failed, not
        # delivered again for longer than the invisible time (the ack took effect after all).
        # Then a quiet period of the invisible time + 3 s after the last successful ack, in which
        # an acked message whose pop state was lost would come back.
        settle = args.invisible + 3
        deadline = time.monotonic() + args.drain_secs
        while time.monotonic() < deadline:
            now = time.monotonic()
            with stats.lock:
                unsettled = [mid for mid in stats.ok if mid not in stats.acked
                             and (mid not in stats.received or now - stats.last_delivery[mid] < settle)]
            if not unsettled:
                break
            time.sleep(0.2)
        while True:
            with stats.lock:
                quiet_until = max(time.monotonic(), (stats.last_ack or 0) + settle)
            if time.monotonic() >= quiet_until:
                break
            time.sleep(0.2)
        stop.set()
        consumer_thread.join(AWAIT + 3 + 12)
        ack_pool.shutdown(wait=False)
        bounded(25, "SimpleConsumer.shutdown()", consumer.shutdown)
        _, leader_after, _ = leader_now(cli)

        with stats.lock:
            ok = dict(stats.ok)
            received, acked = set(stats.received), set(stats.acked)
            t_kill = kill["t"]
            after_kill = sorted(done for issued, done in ok.values() if issued >= t_kill)
            first_after = after_kill[0] - t_kill if after_kill else None
            dones = sorted(done for _, done in ok.values())
            gap, gap_at = 0.0, 0.0
            for a, b in zip(dones, dones[1:]):
                if b - a > gap:
                    gap, gap_at = b - a, a - t_kill
            lost = set(ok) - received
            not_acked = set(ok) - acked
            extra = received - set(ok)
            fails = list(stats.send_failures)
            figures = [
                f"sent ok {len(ok)} of {args.count}",
                f"send failures {len(fails)}",
                f"received {len(received)} ({stats.deliveries} deliveries; {len(extra)} whose send reported failure)",
                f"acked {len(acked)} (ack failures {len(stats.ack_failures)})",
                f"redelivered before ack {stats.redelivered_before_ack}",
                f"delivered after ack {len(stats.after_ack)}",
                f"receive errors {len(stats.receive_errors)}",
                "kill -> first ok send issued after it " + (f"{first_after:.2f} s" if first_after is not None else "never"),
                f"longest pause between ok sends {gap:.2f} s (starting {gap_at:+.2f} s from the kill)",
                f"leader node {kill['node']} -> {leader_after}",
            ]
        for f in figures:
            log(f"failover: {f}")
        def top(what, errors):
            kinds = {}
            for t, e in errors:
                k = e[:140]
                n, first = kinds.get(k, (0, t))
                kinds[k] = (n + 1, min(first, t))
            for e, (n, first) in sorted(kinds.items(), key=lambda kv: -kv[1][0])[:3]:
                log(f"failover:   {what} x{n} (first {first - t_kill:+.1f} s from the kill): {e}")

        top("send failure", [(d, e) for _, d, e in fails])
        top("receive error", stats.receive_errors)
        top("ack failure", [(t, e) for t, _, e in stats.ack_failures])
        problems = []
        if lost:
            sample = sorted(lost, key=lambda mid: ok[mid][0])[:5]
            problems.append(
                f"every acknowledged send received, {len(lost)} never were (e.g. "
                + ", ".join(f"{mid} sent {ok[mid][0] - t_kill:+.2f} s from the kill" for mid in sample) + ")")
        if stats.after_ack:
            sample = stats.after_ack[:5]
            dup_store = sum(1 for _, a, _ in stats.after_ack if a in (None, 1))
            problems.append(
                f"no message delivered after its ack succeeded, {len(stats.after_ack)} were "
                f"({dup_store} with delivery_attempt 1: a second stored copy, e.g. a retried send not "
                f"deduplicated; the rest redelivered: an acked pop state lost) e.g. "
                + ", ".join(f"{mid} attempt {a} at {t - t_kill:+.1f} s" for mid, a, t in sample))
        if not lost and not_acked:
            log(f"failover: note: {len(not_acked)} received whose acks failed and which were not delivered "
                f"again (their acks took effect on the server, or the drain ran out)")
        if problems:
            for pr in problems:
                log(f"FAIL failover: expected {pr}")
            die(1)
        log(f"ok failover nothing acknowledged lost, nothing acked delivered again "
            f"({len(ok)} sent ok, {len(received)} received, leader {kill['node']} killed)")
        die(0)
    except Fail as e:
        log(f"FAIL failover: expected {e}")
        die(1)
    except Exception as e:
        log(f"FAIL failover: unexpected {err_text(e)}")
        import traceback
        traceback.print_exc()
        die(1)


if __name__ == "__main__":
    main()

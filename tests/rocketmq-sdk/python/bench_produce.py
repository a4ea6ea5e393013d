"""Produce throughput of the official RocketMQ 5 Python SDK against raftmq's gateway. Not run by CI.

Usage (the venv scripts/rocketmq-python-sdk-test.sh makes; a `raftmq dev` cluster running):
    /var/tmp/raftmq-rocketmq-sdk-pyenv/bin/python tests/rocketmq-sdk/python/bench_produce.py \
        --access-point 127.0.0.1:10911 [--namesrv 127.0.0.1:9876 --bin RAFTMQ] [--topic T] \
        [-n 20000] [-k 256] [--size 128] [--threads 0]

Sends N messages of SIZE bytes (default 20000 of 128 B) to TOPIC, K in flight: with --threads 0
(default) as send_async futures, else from that many threads each calling send(). Prints msgs/s
and the latency of each send (send to receipt) at p50/p99/max. With --namesrv and --bin the
topic is created first (type normal, 4 queues); otherwise it must exist or be auto-created.
The Python SDK itself is usually the bottleneck here (one asyncio loop thread, per-send signing
and protobuf work), so compare runs of this script with each other rather than with
`raftmq bench`.
"""

import argparse
import threading
import time

from rocketmq import ClientConfiguration, Credentials, Message, Producer
from sdkutil import Cli, die, err_text, log


def percentile(sorted_values, q):
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--access-point", required=True)
    p.add_argument("--topic", default="sdk-bench")
    p.add_argument("-n", "--count", type=int, default=20000)
    p.add_argument("-k", "--inflight", type=int, default=256)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=0, help="0: send_async futures; N: N threads calling send()")
    p.add_argument("--namesrv", default="")
    p.add_argument("--bin", default="")
    args = p.parse_args()

    if args.namesrv and args.bin:
        Cli(args.bin, args.namesrv).create_topic(args.topic, "normal")
    producer = Producer(ClientConfiguration(args.access_point, Credentials()), (args.topic,))
    producer.startup()
    body = b"x" * args.size

    def message():
        m = Message()
        m.topic = args.topic
        m.body = body
        return m

    producer.send(message())  # warm-up: route, channel, Settings
    lock = threading.Lock()
    latencies = []
    failures = []
    t0 = time.monotonic()
    if args.threads <= 0:
        slots = threading.Semaphore(args.inflight)
        remaining = [args.count]
        done = threading.Event()

        def on_done(started, future):
            try:
                future.result()
                with lock:
                    latencies.append(time.monotonic() - started)
            except Exception as e:
                with lock:
                    failures.append(err_text(e))
            finally:
                slots.release()
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        for _ in range(args.count):
            slots.acquire()
            started = time.monotonic()
            try:
                producer.send_async(message()).add_done_callback(lambda f, s=started: on_done(s, f))
            except Exception as e:
                with lock:
                    failures.append(err_text(e))
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()
                slots.release()
        done.wait(300)
    else:
        next_index = [0]

        def worker():
            while True:
                with lock:
                    if next_index[0] >= args.count:
                        return
                    next_index[0] += 1
                started = time.monotonic()
                try:
                    producer.send(message())
                    with lock:
                        latencies.append(time.monotonic() - started)
                except Exception as e:
                    with lock:
                        failures.append(err_text(e))

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(args.threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
    secs = time.monotonic() - t0
    producer.shutdown()
    lat = sorted(latencies)
    mode = f"{args.inflight} in flight (send_async)" if args.threads <= 0 else f"{args.threads} threads (send)"
    log(f"bench_produce: {len(lat)} sent, {len(failures)} failed in {secs:.2f} s: "
        f"{len(lat) / max(secs, 1e-9):.0f} msgs/s, {args.size} B bodies, {mode}; latency ms "
        f"p50 {percentile(lat, 0.5) * 1000:.1f} p99 {percentile(lat, 0.99) * 1000:.1f} "
        f"max {(lat[-1] if lat else float('nan')) * 1000:.1f}")
    if failures:
        log(f"bench_produce: first failure: {failures[0][:200]}")
    die(1 if failures else 0)


if __name__ == "__main__":
    main()

"""Sends a few messages, then consumes them as a consumer group.

    python example.py [NAMESERVER_HOST:PORT]     # default 127.0.0.1:9876 (`raftmq dev`)
"""

import sys
import time

import raftmq

TOPIC = "PyExample"
GROUP = "py-example"


def main() -> None:
    nameserver = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9876"
    with raftmq.Client([nameserver]) as client:
        producer = client.producer()
        for i in range(5):
            r = producer.send(TOPIC, f"hello {i}".encode(), tag="TagA", keys=[f"order-{i}"])
            print(f"sent     {r.message_id}  {r.broker_group}/{r.queue_id}@{r.queue_offset}")

        # A group that has never consumed TOPIC starts at each queue's first message;
        # run this twice and the second run sees only the new messages.
        with raftmq.Consumer(client, GROUP, TOPIC, start_from="first") as consumer:
            received, deadline = 0, time.monotonic() + 30
            while received < 5 and time.monotonic() < deadline:
                for m in consumer.poll(timeout_s=1.0):
                    print(f"received {m.message_id}  {m.broker_group}/{m.queue_id}@{m.queue_offset}  {m.body.decode()}")
                    received += 1
        # Leaving the `with` closed the consumer: offsets committed, queues released.
        if received < 5:
            sys.exit(f"received {received} of 5 within 30 s")


if __name__ == "__main__":
    main()

"""Send a few messages and consume them as a consumer group.

    python example.py 127.0.0.1:9876
"""

import sys

import raftmq_client as rmq

nameserver = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:9876"
with rmq.Client([nameserver]) as client:
    producer = client.producer()
    for i in range(5):
        r = producer.send("PyExample", f"hello {i}".encode(), tag="TagA", keys=[f"order-{i}"])
        print(f"sent {r.message_id} to {r.broker_group}/{r.queue_id}@{r.queue_offset}")
    consumer = rmq.Consumer(client, "py-example", "PyExample", start_from="first")
    received = 0
    while received < 5:
        for m in consumer.poll(timeout=5.0):
            print(f"received {m.message_id}: {m.message.body.decode()}")
            received += 1
    consumer.close()

"""End-to-end check of the Python client against a live raftmq cluster.

Usage: python ci_test.py NAMESERVER_HOST:PORT

(a) sends 200 messages, (b) consumes them as a consumer group, each exactly once,
and checks the committed offsets, (c) sends to a follower directly and gets
FAILED_PRECONDITION with the `raftmq-leader` metadata, then lets the wrapper start
at that follower and follow the redirect. Exits non-zero on any failure.
"""

import sys
import time
import uuid

import grpc

import raftmq_client as rmq
from raftmq_client import pb, pb_grpc


def fail(why: str) -> None:
    print(f"FAIL: {why}", file=sys.stderr)
    sys.exit(1)


def main() -> None:
    if len(sys.argv) != 2:
        fail("usage: ci_test.py NAMESERVER_HOST:PORT")
    topic = f"py-{uuid.uuid4().hex[:8]}"
    count = 200
    with rmq.Client([sys.argv[1]]) as client:
        producer = client.producer()
        # (a) send; the dev cluster creates the topic (4 queues) on first send.
        sent = {}
        for i in range(count):
            r = producer.send(topic, f"body-{i}".encode(), tag="TagA", keys=[f"k{i}"], properties={"seq": str(i)})
            sent[r.message_id] = i
        if len(sent) != count:
            fail(f"{count} sends gave {len(sent)} distinct message ids")
        print(f"sent {count} messages to {topic}")

        # (b) consume as a group: every message exactly once.
        deadline = time.monotonic() + 60
        while True:
            route = client.route(topic, refresh=True)
            if route.groups and route.groups[0].queues > 0:
                break
            if time.monotonic() > deadline:
                fail("the NameServer never learned the topic")
            time.sleep(0.1)
        consumer = rmq.Consumer(client, "py-group", topic)
        seen = {}
        while len(seen) < count:
            if time.monotonic() > deadline:
                fail(f"consumed {len(seen)} of {count} within 60 s; held queues {consumer.offsets}")
            for m in consumer.poll(timeout=1.0):
                seq = int(m.message.properties["seq"])
                if seq in seen:
                    fail(f"message {seq} delivered twice")
                if sent.get(m.message_id) != seq:
                    fail(f"message id {m.message_id} does not match its send (seq {seq})")
                seen[seq] = m
        consumer.close()
        group = route.groups[0]
        committed = 0
        admin_endpoint = client.leader_of(topic, group.broker_group)
        stub = pb_grpc.ConsumerServiceStub(client.channel(admin_endpoint))
        for q in range(group.queues):
            r = stub.QueryOffset(pb.QueryOffsetRequest(consumer_group="py-group", topic=topic, queue_id=q))
            if not r.HasField("offset") or r.offset != r.max_offset:
                fail(f"queue {q}: committed {r.offset if r.HasField('offset') else None}, max {r.max_offset}")
            committed += r.offset
        if committed != count:
            fail(f"committed offsets add up to {committed}, not {count}")
        print(f"consumed {count} messages exactly once as group py-group; offsets committed")

        # (c) NOT_LEADER: a follower refuses the write and names the leader.
        if not group.follower_endpoints:
            fail(f"route names no follower: {group}")
        follower = group.follower_endpoints[0]
        try:
            pb_grpc.MessagingServiceStub(client.channel(follower)).Send(
                pb.SendRequest(topic=topic, messages=[pb.Message(topic=topic, body=b"direct")]), timeout=3
            )
            fail(f"follower {follower} accepted a write")
        except grpc.RpcError as e:
            err = rmq._error(e, follower)
            if err.code != grpc.StatusCode.FAILED_PRECONDITION or err.leader != group.leader_endpoint:
                fail(f"follower answered {err.code} leader={err.leader!r}; wanted FAILED_PRECONDITION naming {group.leader_endpoint}")
        print(f"follower {follower} answered FAILED_PRECONDITION, raftmq-leader={err.leader}")
        client.set_leader(topic, group.broker_group, follower)
        r = producer.send(topic, b"redirected", properties={"seq": "redirected"}, broker_group=group.broker_group)
        if client.leader_of(topic, group.broker_group) != group.leader_endpoint:
            fail("the producer did not learn the leader from the redirect")
        back = client.pull(topic, group.broker_group, r.queue_id, r.queue_offset, 1)
        if not back.messages or back.messages[0].message.body != b"redirected":
            fail(f"the redirected send is not stored where its result says: {r}")
        print(f"a send started at the follower was redirected to {group.leader_endpoint} and stored as {r.message_id}")
    print("python client: OK")


if __name__ == "__main__":
    main()

"""raftmq: a small Python client for raftmq, built from proto/ alone.

    import raftmq

    with raftmq.Client(["127.0.0.1:9876"]) as client:
        result = client.producer().send("Orders", b"hello", tag="TagA", keys=["order-1"])
        consumer = raftmq.Consumer(client, "order-service", "Orders")
        for message in consumer.poll(timeout_s=5):
            print(message.message_id, message.body)
        consumer.close()

* Client: NameServer routes (cached per topic, refreshed on error), one gRPC
  channel per endpoint, ``pull`` by offset, leader hints (``set_leader``).
* Producer.send: to the broker group's leader, following ``raftmq-leader``
  redirects at once; a leader that fails or stays silent past ``rpc_timeout`` is
  skipped for a moment while its replicas are asked who leads now.
  ``send(..., delay_ms=...)`` (or ``deliver_at_ms`` / ``delay_level``) delays
  delivery.
* Consumer: a clustering consumer-group member (heartbeats, assigned queues,
  release of revoked queues, offsets committed by the leader); ``send_back``
  hands a failed message to ``%RETRY%<group>`` (or ``%DLQ%<group>``), whose
  retries come out of ``poll`` again.
* SimpleConsumer: POP consumption (receive with an invisible time, ack by
  receipt handle, change_invisible_duration, forward_to_dead_letter).
* TransactionProducer: transactional messages. ``send(topic, body,
  local_transaction)`` stores a half message, runs the local transaction and
  commits or rolls back as it answers (a TransactionResolution); ``begin``,
  ``commit`` and ``rollback`` do it by hand. The brokers' check-backs about
  transactions left UNKNOWN come over streams it keeps open to every replica and
  are answered by its ``checker``.
* RaftmqError: every failure, with the gRPC code and the server's message.

The gRPC stubs are generated from proto/ into raftmq/_gen/ (client/python/
generate.sh, or on first import when grpcio-tools is installed); ``pb`` and
``pb_grpc`` expose them for calls the wrapper does not cover.
"""

from ._pb import pb, pb_grpc
from .client import (
    LEADER_METADATA_KEY,
    Client,
    GroupRoute,
    Producer,
    PullResult,
    QueueOffset,
    RaftmqError,
    ReceivedMessage,
    SendResult,
    TopicRoute,
    error_from_rpc,
)
from .consumer import Consumer, dlq_topic, retry_topic
from .simple import AckResult, PopMessage, SimpleConsumer
from .transaction import (
    EndTransactionResult,
    HalfMessage,
    TransactionCheck,
    TransactionProducer,
    TransactionResolution,
    TransactionSendResult,
)

__all__ = [
    "LEADER_METADATA_KEY",
    "AckResult",
    "Client",
    "Consumer",
    "EndTransactionResult",
    "GroupRoute",
    "HalfMessage",
    "PopMessage",
    "Producer",
    "PullResult",
    "QueueOffset",
    "RaftmqError",
    "ReceivedMessage",
    "SendResult",
    "SimpleConsumer",
    "TopicRoute",
    "TransactionCheck",
    "TransactionProducer",
    "TransactionResolution",
    "TransactionSendResult",
    "dlq_topic",
    "error_from_rpc",
    "pb",
    "pb_grpc",
    "retry_topic",
]

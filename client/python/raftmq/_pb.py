"""The generated protobuf and gRPC modules (raftmq.v1), generated first if needed.

Kept in one place so the rest of the package never touches ``_gen`` paths."""

from ._codegen import ensure_generated

ensure_generated()

from ._gen.raftmq.v1 import messaging_pb2 as pb  # noqa: E402
from ._gen.raftmq.v1 import messaging_pb2_grpc as pb_grpc  # noqa: E402

__all__ = ["pb", "pb_grpc"]

"""Generates the gRPC stubs from the repository's proto/ with grpcio-tools.

The stubs are not committed: proto/ is the one source of truth, and generating
them on first import (or again when a .proto file is newer) keeps them in step.
They go to client/python/gen/, which is put on sys.path, so the generated
modules import each other as `raftmq.v1.messaging_pb2` like protoc expects.
"""

import os
import sys
from pathlib import Path

_HERE = Path(__file__).resolve().parent
PROTO_ROOT = Path(os.environ.get("RAFTMQ_PROTO_DIR", _HERE.parent.parent.parent / "proto" / "proto"))
GEN_DIR = Path(os.environ.get("RAFTMQ_PY_GEN_DIR", _HERE.parent / "gen"))
PROTOS = ["raftmq/v1/messaging.proto"]


def _stale() -> bool:
    for proto in PROTOS:
        src = PROTO_ROOT / proto
        out = GEN_DIR / proto.replace(".proto", "_pb2_grpc.py")
        if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
            return True
    return False


def generate() -> None:
    """Runs protoc (from grpcio-tools) over PROTOS into GEN_DIR."""
    from grpc_tools import protoc  # imported here: only generation needs grpcio-tools
    import grpc_tools

    for proto in PROTOS:
        if not (PROTO_ROOT / proto).exists():
            raise RuntimeError(f"{PROTO_ROOT / proto} not found; set RAFTMQ_PROTO_DIR to the repository's proto/proto")
    GEN_DIR.mkdir(parents=True, exist_ok=True)
    well_known = Path(grpc_tools.__file__).parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={GEN_DIR}",
        f"--grpc_python_out={GEN_DIR}",
        *PROTOS,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def load():
    """Returns (messaging_pb2, messaging_pb2_grpc), generating them when stale."""
    if _stale():
        generate()
    if str(GEN_DIR) not in sys.path:
        sys.path.insert(0, str(GEN_DIR))
    from raftmq.v1 import messaging_pb2, messaging_pb2_grpc  # noqa: E402  (generated)

    return messaging_pb2, messaging_pb2_grpc


if __name__ == "__main__":
    generate()
    print(f"stubs generated in {GEN_DIR}")

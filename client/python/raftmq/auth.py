"""Request signatures for brokers with ``[auth] enabled`` (raftmq's ACL).

Every call carries ``authorization: RAFTMQ-HMAC-SHA256 Credential=<access key>,
Date=<unix ms>, Nonce=<hex>, Signature=<hex>``, the signature being
HMAC-SHA256(secret, "raftmq-request-v1\\n" + date + "\\n" + nonce + "\\n" + method
path). A broker accepts a signature once, within its window (5 minutes by
default), so a captured request cannot be replayed. Same scheme as the Rust
client (``raftmq_proto::request_auth``).
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import os
import time
from typing import Any

import grpc

SCHEME = "RAFTMQ-HMAC-SHA256"


def sign(access_key: str, secret: str, method: str, unix_ms: int, nonce: str) -> str:
    """The ``authorization`` value for one call of ``method`` (``/pkg.Service/Rpc``)."""
    msg = f"raftmq-request-v1\n{unix_ms}\n{nonce}\n{method}".encode()
    mac = hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()
    return f"{SCHEME} Credential={access_key}, Date={unix_ms}, Nonce={nonce}, Signature={mac}"


class _Details(
    collections.namedtuple(
        "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
    ),
    grpc.ClientCallDetails,
):
    pass


class Signer(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds a fresh signature to every call made through the channel it wraps."""

    def __init__(self, access_key: str, secret: str) -> None:
        if not access_key or any(c in access_key for c in " ,=/") or not access_key.isprintable():
            raise ValueError(f"access_key {access_key!r} must be printable, without spaces , = /")
        if not secret:
            raise ValueError("secret must not be empty")
        self._access_key = access_key
        self._secret = secret

    def __repr__(self) -> str:  # never the secret
        return f"Signer(access_key={self._access_key!r})"

    def _details(self, d: Any) -> _Details:
        metadata = list(d.metadata or [])
        value = sign(self._access_key, self._secret, d.method, int(time.time() * 1000), os.urandom(16).hex())
        metadata.append(("authorization", value))
        return _Details(
            d.method,
            d.timeout,
            metadata,
            d.credentials,
            getattr(d, "wait_for_ready", None),
            getattr(d, "compression", None),
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

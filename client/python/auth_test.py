"""The Python client against brokers that require signed requests (#20).

    python auth_test.py NAMESERVER_HOST:PORT ADMIN_SECRET_FILE

Run by `RAFTMQ_CLIENT_AUTH=1 scripts/python-client-test.sh` against `raftmq dev --auth`
(bootstrap admin `admin`). Checks that a client with the admin's credentials
sends and reads back, that one without credentials, and one with a wrong
secret, are refused UNAUTHENTICATED, and that the refused sends stored nothing.
Exits 1 naming the failed check.
"""

from __future__ import annotations

import sys
import time

import grpc

import raftmq

TOPIC = f"py-auth-{int(time.time())}"


def main() -> int:
    namesrv, secret_file = sys.argv[1], sys.argv[2]
    with raftmq.Client([namesrv], access_key="admin", secret_file=secret_file) as admin:
        sent = [admin.producer().send(TOPIC, f"signed-{i}".encode()) for i in range(5)]
        # The queues the sends landed in (the route may still be provisional).
        queues = sorted({(r.broker_group, r.queue_id) for r in sent})

        def read_back() -> list[bytes]:
            return [m.body for g, q in queues for m in admin.pull(TOPIC, g, q, 0, max_messages=100).messages]

        bodies = read_back()
        if sorted(bodies) != sorted(f"signed-{i}".encode() for i in range(5)):
            print(f"FAIL signed: sent {len(sent)}, read back {bodies!r}")
            return 1
        print("ok   signed: 5 sent and read back as admin")

        for what, kwargs in [
            ("no credentials", {}),
            ("a wrong secret", {"access_key": "admin", "secret": "not-the-admin-secret-0"}),
        ]:
            with raftmq.Client([namesrv], send_deadline=2.0, **kwargs) as c:
                try:
                    c.producer().send(TOPIC, b"refused")
                except raftmq.RaftmqError as e:
                    if e.code != grpc.StatusCode.UNAUTHENTICATED:
                        print(f"FAIL {what}: refused with {e.code.name}: {e.message}")
                        return 1
                    print(f"ok   {what}: UNAUTHENTICATED ({e.message})")
                else:
                    print(f"FAIL {what}: the send was accepted")
                    return 1

        bodies = read_back()
        if len(bodies) != 5:
            print(f"FAIL nothing written: the topic holds {len(bodies)} messages, not 5")
            return 1
        print("ok   nothing written by the refused sends")
    return 0


if __name__ == "__main__":
    sys.exit(main())

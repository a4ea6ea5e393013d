"""The official RocketMQ 5 Python SDK against brokers that require signed requests (#20).

    python auth_test.py --access-point HOST:PORT --namesrv HOST:PORT --bin RAFTMQ --data-dir DIR

Run by `RAFTMQ_SDK_AUTH=1 scripts/rocketmq-python-sdk-test.sh` against `raftmq dev --auth`,
with RAFTMQ_ACCESS_KEY / RAFTMQ_SECRET_FILE naming the bootstrap admin for the CLI. The
admin creates a user `sdk-app` allowed PUB and SUB on one topic (and SUB as any group);
then, through the SDK's own `Credentials` (its MQv2-HMAC-SHA1 signature):

  allowed    sdk-app's producer sends, its SimpleConsumer receives and acks the message
  anonymous  a producer without credentials cannot send
  wrong      a producer with sdk-app's key and a wrong secret cannot send
  denied     sdk-app's producer cannot send to a topic no rule allows it

Exits 1 naming each failed check.
"""

import argparse
import os
import sys
import time

from rocketmq import ClientConfiguration, Credentials, FilterExpression, Producer, SimpleConsumer
from sdk_test import ack, err, new_message, receive, running, send
from sdkutil import Cli, Fail, bounded, die, expect, log, run_id

APP = "sdk-app"


def refused_send(config, topic, what):
    """A send through a producer built with `config` must fail; returns why."""
    producer = Producer(config, (topic,))
    try:
        bounded(25, f"{what}: startup()", producer.startup)
    except Exception as e:  # refused at startup: as good as at send
        return f"startup refused: {err(e)}"
    try:
        try:
            bounded(30, f"{what}: send()", producer.send, new_message(topic, f"{what} must not be stored"))
        except Fail:
            raise
        except Exception as e:
            return err(e)
        raise Fail(f"{what}: the send was accepted")
    finally:
        try:
            bounded(25, f"{what}: shutdown()", producer.shutdown)
        except Exception:
            pass


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--access-point", required=True)
    p.add_argument("--namesrv", required=True)
    p.add_argument("--bin", required=True)
    p.add_argument("--data-dir", required=True)
    args = p.parse_args()
    cli = Cli(args.bin, args.namesrv)
    run = run_id()
    topic, other, group = f"sdk-auth-{run}", f"sdk-auth-other-{run}", f"sdk-auth-g-{run}"
    secret = f"sdk-app-secret-{run}"
    secret_file = os.path.join(args.data_dir, "sdk-app-secret")
    with open(secret_file, "w") as f:
        f.write(secret)
    cli.create_topic(topic, "normal")
    cli.create_topic(other, "normal")
    cli.admin("user", "create", "--user", APP, "--user-secret-file", secret_file)
    cli.admin("acl", "put", "--user", APP, "--topic", topic, "--perm", "pub,sub")
    cli.admin("acl", "put", "--user", APP, "--group", "*", "--perm", "sub")

    app = ClientConfiguration(args.access_point, Credentials(APP, secret))
    failed = []

    def step(name, fn):
        try:
            log(f"ok   {name}: {fn()}")
        except Exception as e:
            failed.append(name)
            log(f"FAIL {name}: {err(e) if not isinstance(e, Fail) else e}")

    def allowed():
        with running(Producer(app, (topic,)), "Producer") as producer:
            sent = send(producer, new_message(topic, f"signed {run}"), "signed send")
        consumer = SimpleConsumer(app, group, {topic: FilterExpression("*")}, await_duration=5)
        with running(consumer, "SimpleConsumer") as c:
            deadline = time.monotonic() + 30
            while True:
                got = [m for m in receive(c, 16, 20) if m.message_id == sent.message_id]
                if got:
                    ack(c, got[0])
                    break
                expect(time.monotonic() < deadline, f"message {sent.message_id} received within 30 s")
        return f"sent {sent.message_id} with sdk-app's credentials, received and acked it"

    step("allowed", allowed)
    step("anonymous", lambda: refused_send(ClientConfiguration(args.access_point, Credentials()), topic, "anonymous"))
    step("wrong", lambda: refused_send(
        ClientConfiguration(args.access_point, Credentials(APP, "not-the-secret-of-sdk-app")), topic, "wrong secret"))
    step("denied", lambda: refused_send(app, other, "no PUB on the topic"))
    if failed:
        log(f"auth_test: FAILED {', '.join(failed)}")
        die(1)
    die(0)


if __name__ == "__main__":
    main()

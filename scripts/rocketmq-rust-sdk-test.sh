#!/usr/bin/env bash
# The official RocketMQ 5 Rust SDK's end-to-end test: builds tests/rocketmq-sdk/rust (crates.io
# `rocketmq` 5.0.0, a standalone crate outside the workspace), starts a `raftmq dev` cluster on
# free loopback ports, creates a topic, and runs the test binary against the first broker node's
# client port, where raftmq serves apache.rocketmq.v2.MessagingService.
#
#   RAFTMQ_BIN                  the raftmq binary (default: $CARGO_TARGET_DIR/debug/raftmq,
#                               CARGO_TARGET_DIR defaulting to /var/tmp/raftmq-target)
#   RAFTMQ_RUST_SDK_TARGET_DIR  the SDK crate's own target dir (default /var/tmp/raftmq-rust-sdk-target).
#                               Not CARGO_TARGET_DIR: CI exports that for the workspace, and the SDK's
#                               tonic 0.8/0.9 + ring tree has no business in the workspace's target dir.
#   RAFTMQ_RUST_SDK_COUNT       messages to send and receive (default 64)
#   RAFTMQ_RUST_SDK_TIMEOUT     seconds the consumer may take to receive them all (default 60)
#
# The cluster is stopped by its PID whatever happens, and its data dir removed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

bin="${RAFTMQ_BIN:-${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}/debug/raftmq}"
sdk_target="${RAFTMQ_RUST_SDK_TARGET_DIR:-/var/tmp/raftmq-rust-sdk-target}"
count="${RAFTMQ_RUST_SDK_COUNT:-64}"
timeout_secs="${RAFTMQ_RUST_SDK_TIMEOUT:-60}"
[ -x "$bin" ] || { echo "rocketmq-rust-sdk-test: no raftmq binary at $bin (build it first, or set RAFTMQ_BIN)" >&2; exit 1; }

# --locked: the crate's Cargo.lock is committed, so CI builds exactly the tree that was measured.
CARGO_TARGET_DIR="$sdk_target" cargo build --locked --manifest-path "$root/tests/rocketmq-sdk/rust/Cargo.toml"
sdk_bin="$sdk_target/debug/raftmq-rocketmq-rust-sdk-test"

data=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-rustsdk.XXXXXX")
out="$data/dev.out"
err="$data/dev.err"
pid=""
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    # `raftmq dev` stops its replicas on SIGTERM; give it 30 s before SIGKILL.
    for _ in $(seq 1 300); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "rocketmq-rust-sdk-test: raftmq dev (pid $pid) ignored SIGTERM; killing it and its replicas" >&2
      kill -KILL "$pid" 2>/dev/null || true
      # Its replicas are processes of their own; their pids are in the data dir.
      for f in "$data"/cluster/*.pid; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
      done
    fi
    wait "$pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$err" ]; then
    echo "rocketmq-rust-sdk-test: last lines of raftmq dev's stderr:" >&2
    tail -20 "$err" >&2 || true
  fi
  rm -rf "$data"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Loopback only: the NameServer on 127.0.0.1, the replicas on 127.0.0.1 (dev's default),
# every port picked free by the OS.
"$bin" dev --data-dir "$data/cluster" --namesrv-listen 127.0.0.1:0 --broker-ports 0,0,0 >"$out" 2>"$err" &
pid=$!

# `raftmq dev` prints "  NameServer        127.0.0.1:PORT" once the group has a leader, then one
# "  broker-a node N  HOST:PORT  pid P  log FILE  (role)" line per replica. Wait for both: the
# access point is the first node line's client address (every node serves the gRPC gateway).
namesrv=""
access=""
deadline=$((SECONDS + 60))
while [ -z "$namesrv" ] || [ -z "$access" ]; do
  namesrv=$(awk '$1 == "NameServer" { print $2; exit }' "$out" 2>/dev/null || true)
  access=$(awk '$2 == "node" { print $4; exit }' "$out" 2>/dev/null || true)
  [ -n "$namesrv" ] && [ -n "$access" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "rocketmq-rust-sdk-test: raftmq dev exited before the cluster was up" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "rocketmq-rust-sdk-test: raftmq dev did not come up within 60 s" >&2; exit 1; }
  sleep 0.1
done
echo "rocketmq-rust-sdk-test: cluster up (pid $pid), NameServer $namesrv, access point $access"

# The SDK's producer and consumer fetch the topic's route in start() and fail fast without one,
# so the topic exists before either starts (not left to auto-create on first send).
topic=rust_sdk_test
group=rust_sdk_group
"$bin" admin topic create --namesrv "$namesrv" --topic "$topic" --queues 4

# The SDK logs at debug level to stderr, including a harmless ERROR for every Settings reply
# ("receive telemetry command but there is no handler"): keep it out of a passing run's output,
# show its tail (which ends with the test's FAILED line) when the run fails.
sdk_log="$data/sdk.log"
if ! "$sdk_bin" --access-point "$access" --topic "$topic" --group "$group" \
  --count "$count" --timeout-secs "$timeout_secs" 2>"$sdk_log"; then
  echo "rocketmq-rust-sdk-test: last lines of the test's stderr (the SDK's log, then the failure):" >&2
  tail -60 "$sdk_log" >&2 || true
  exit 1
fi

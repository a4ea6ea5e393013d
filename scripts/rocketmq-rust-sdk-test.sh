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

LABEL=rocketmq-rust-sdk-test
# shellcheck source=scripts/dev-cluster.sh
. "$root/scripts/dev-cluster.sh"
sdk_log=""
dev_cluster_on_failure() {
  # The SDK logs at debug level to stderr, including a harmless ERROR for every Settings
  # reply ("receive telemetry command but there is no handler"): kept out of a passing
  # run's output; its tail (which ends with the test's FAILED line) shown on failure.
  if [ -n "$sdk_log" ] && [ -s "$sdk_log" ]; then
    echo "$LABEL: last lines of the test's stderr (the SDK's log, then the failure):" >&2
    tail -60 "$sdk_log" >&2
  fi
}
dev_cluster_start
namesrv=$DEV_NAMESRV
access=$DEV_ACCESS
echo "$LABEL: access point $access"

# The SDK's producer and consumer fetch the topic's route in start() and fail fast without one,
# so the topic exists before either starts (not left to auto-create on first send).
topic=rust_sdk_test
group=rust_sdk_group
"$bin" admin topic create --namesrv "$namesrv" --topic "$topic" --queues 4

sdk_log="$DEV_DATA/sdk.log"
"$sdk_bin" --access-point "$access" --topic "$topic" --group "$group" \
  --count "$count" --timeout-secs "$timeout_secs" 2>"$sdk_log"

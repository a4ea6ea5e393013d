#!/usr/bin/env bash
# The official RocketMQ 5 Python SDK (PyPI `rocketmq-python-client`, pinned) against raftmq's
# apache.rocketmq.v2.MessagingService gateway: a venv with the SDK, a `raftmq dev` cluster on free
# loopback ports, then
#   1. tests/rocketmq-sdk/python/sdk_test.py   producer, simple/push consumers, FIFO, delay,
#                                               transactions, retry + DLQ, bad input (one line per step)
#   2. tests/rocketmq-sdk/python/failover.py   SDK producer + consumer while the group's leader is
#                                               SIGKILLed once: nothing acknowledged lost, nothing acked
#                                               delivered again, figures printed
# The access point is one broker node's client port (every node serves or forwards every RPC).
# The failover step runs even if a step before it failed; the script exits non-zero if either did.
# About 1.5 min on a working server (sdk_test ~40 s, failover ~45 s).
#
#   RAFTMQ_BIN             the raftmq binary (default: $CARGO_TARGET_DIR/debug/raftmq,
#                          CARGO_TARGET_DIR defaulting to /var/tmp/raftmq-target)
#   RAFTMQ_SDK_PYENV       the venv, made on first use and reused (default /var/tmp/raftmq-rocketmq-sdk-pyenv)
#   RAFTMQ_PYTHON          the interpreter that makes the venv (default python3.11, else python3)
#   RAFTMQ_SDK_STEPS       comma-separated sdk_test.py steps to run (default: all; see its --help)
#   RAFTMQ_SDK_FAILOVER    0 skips the failover step (default 1)
#   RAFTMQ_SDK_AUTH        1: only tests/rocketmq-sdk/python/auth_test.py, against `raftmq dev --auth`
#                          (the SDK's Credentials: signed requests served, bad ones refused)
#
# The SDK logs to ~/logs/rocketmq_python/rocketmq_client.log, never to stdout: on failure the lines
# this run added to it are shown (the last 40). The cluster is stopped by its PID whatever happens,
# and its data dir removed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

SDK_VERSION=5.1.2

bin="${RAFTMQ_BIN:-${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}/debug/raftmq}"
pyenv="${RAFTMQ_SDK_PYENV:-/var/tmp/raftmq-rocketmq-sdk-pyenv}"
steps="${RAFTMQ_SDK_STEPS:-}"
failover="${RAFTMQ_SDK_FAILOVER:-1}"
[ -x "$bin" ] || { echo "rocketmq-python-sdk-test: no raftmq binary at $bin (build it first, or set RAFTMQ_BIN)" >&2; exit 1; }

# shellcheck source=scripts/pinned-venv.sh
. "$root/scripts/pinned-venv.sh"
pinned_venv rocketmq-python-sdk-test "$pyenv" rocketmq-python-client "$SDK_VERSION" || exit 1
py="$pyenv/bin/python"
# Importing the SDK creates its log directory and file; note where this run's lines start.
"$py" -c 'import rocketmq' || { echo "rocketmq-python-sdk-test: the SDK in $pyenv does not import" >&2; exit 1; }
sdk_log="$HOME/logs/rocketmq_python/rocketmq_client.log"
sdk_log_start=$(stat -c %s "$sdk_log" 2>/dev/null || echo 0)

LABEL=rocketmq-python-sdk-test
# shellcheck source=scripts/dev-cluster.sh
. "$root/scripts/dev-cluster.sh"
dev_cluster_on_failure() {
  if [ -s "$sdk_log" ]; then
    echo "$LABEL: last lines this run added to the SDK's log ($sdk_log):" >&2
    if [ "$(stat -c %s "$sdk_log")" -ge "$sdk_log_start" ]; then
      tail -c +"$((sdk_log_start + 1))" "$sdk_log" | tail -40 >&2
    else
      tail -40 "$sdk_log" >&2 # rotated meanwhile
    fi
  fi
}
if [ "${RAFTMQ_SDK_AUTH:-0}" = 1 ]; then
  dev_cluster_start --auth
  # The CLI the test drives signs as the bootstrap admin.
  export RAFTMQ_ACCESS_KEY=admin RAFTMQ_SECRET_FILE="$DEV_DATA/cluster/admin-secret"
  cd "$root/tests/rocketmq-sdk/python"
  timeout -k 10 180 "$py" auth_test.py --access-point "$DEV_ACCESS" --namesrv "$DEV_NAMESRV" --bin "$bin" \
    --data-dir "$DEV_DATA/cluster"
  exit 0
fi
# Transaction checks start after 1 s (not RocketMQ's 6 s) so the check-back step does not
# wait out the default.
dev_cluster_start --transaction-first-check-ms 1000 --transaction-check-interval-ms 1000
namesrv=$DEV_NAMESRV
endpoints=$DEV_NODES
access=$DEV_ACCESS
data=$DEV_DATA
echo "$LABEL: access point $access, SDK rocketmq-python-client $SDK_VERSION"

cd "$root/tests/rocketmq-sdk/python"
# Both scripts bound every wait themselves; `timeout` only stops one that hangs anyway (e.g. in
# an SDK thread) so CI gets an answer. The failover step runs even when a step before it failed
# (both results in one run); the script fails if either did.
rc=0
timeout -k 10 240 "$py" sdk_test.py --access-point "$access" --namesrv "$namesrv" --bin "$bin" \
  --data-dir "$data/cluster" ${steps:+--steps "$steps"} || rc=$?
if [ "$failover" != 0 ]; then
  timeout -k 10 180 "$py" failover.py --nodes "$endpoints" --namesrv "$namesrv" --bin "$bin" \
    --data-dir "$data/cluster" || rc=$?
fi
[ "$rc" -eq 0 ] || echo "rocketmq-python-sdk-test: FAILED (exit $rc)" >&2
exit "$rc"

#!/usr/bin/env bash
# The Python client's end-to-end test (CI runs it): a venv with pinned grpcio,
# grpcio-tools and protobuf from PyPI, stubs generated from proto/, then
# client/python/ci_test.py against a `raftmq dev` cluster on free loopback ports.
#
#   RAFTMQ_BIN     the raftmq binary (default: $CARGO_TARGET_DIR/debug/raftmq,
#                  CARGO_TARGET_DIR defaulting to /var/tmp/raftmq-target)
#   RAFTMQ_PYENV   the venv, made on first use and reused (default /var/tmp/raftmq-pyenv)
#   RAFTMQ_PYTHON  the interpreter that makes the venv (default python3.11, else python3)
#
# The cluster is stopped by its PID whatever happens, and its data dir removed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

GRPCIO_VERSION=1.68.1
GRPCIO_TOOLS_VERSION=1.68.1
PROTOBUF_VERSION=5.29.3

bin="${RAFTMQ_BIN:-${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}/debug/raftmq}"
pyenv="${RAFTMQ_PYENV:-/var/tmp/raftmq-pyenv}"
[ -x "$bin" ] || { echo "python-client-test: no raftmq binary at $bin (build it first, or set RAFTMQ_BIN)" >&2; exit 1; }

# The venv outlives the clone (like the cargo target dir); pip skips what is there.
if [ ! -x "$pyenv/bin/python" ]; then
  python="${RAFTMQ_PYTHON:-$(command -v python3.11 || command -v python3)}"
  "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || { echo "python-client-test: $python is older than 3.11" >&2; exit 1; }
  "$python" -m venv "$pyenv"
fi
"$pyenv/bin/python" -m pip install --quiet --disable-pip-version-check \
  "grpcio==$GRPCIO_VERSION" "grpcio-tools==$GRPCIO_TOOLS_VERSION" "protobuf==$PROTOBUF_VERSION"

PYTHON="$pyenv/bin/python" client/python/generate.sh

data=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-pytest.XXXXXX")
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
      echo "python-client-test: raftmq dev (pid $pid) ignored SIGTERM; killing it and its replicas" >&2
      kill -KILL "$pid" 2>/dev/null || true
      # Its replicas are processes of their own; their pids are in the data dir.
      for f in "$data"/cluster/*.pid; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
      done
    fi
    wait "$pid" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ] && [ -s "$err" ]; then
    echo "python-client-test: last lines of raftmq dev's stderr:" >&2
    tail -20 "$err" >&2 || true
  fi
  rm -rf "$data"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Loopback only: the NameServer on 127.0.0.1, the replicas on 127.0.0.1 (dev's
# default), every port picked free by the OS. Transaction checks start after 1 s
# (not RocketMQ's 6 s) so the check-back step does not wait out the default.
"$bin" dev --data-dir "$data/cluster" --namesrv-listen 127.0.0.1:0 --broker-ports 0,0,0 \
  --transaction-first-check-ms 1000 --transaction-check-interval-ms 1000 >"$out" 2>"$err" &
pid=$!

# `raftmq dev` prints "  NameServer        127.0.0.1:PORT" once the group has a leader.
namesrv=""
deadline=$((SECONDS + 60))
while [ -z "$namesrv" ]; do
  namesrv=$(awk '$1 == "NameServer" { print $2; exit }' "$out" 2>/dev/null || true)
  [ -n "$namesrv" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "python-client-test: raftmq dev exited before the cluster was up" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "python-client-test: raftmq dev did not come up within 60 s" >&2; exit 1; }
  sleep 0.1
done
echo "python-client-test: cluster up (pid $pid), NameServer $namesrv"

cd "$root/client/python"
"$pyenv/bin/python" ci_test.py "$namesrv"

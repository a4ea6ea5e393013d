#!/usr/bin/env bash
# The Python client's end-to-end test (CI runs it): a venv with pinned grpcio,
# grpcio-tools and protobuf from PyPI, stubs generated from proto/, and
# client/python/ci_test.py against a `raftmq dev` cluster on free loopback ports.
# The cluster is stopped by its PID whatever happens.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
bin="${RAFTMQ_BIN:-${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}/debug/raftmq}"
pyenv="${RAFTMQ_PYENV:-/var/tmp/raftmq-pyenv}"
[ -x "$bin" ] || { echo "python-client-test: no raftmq binary at $bin (build it first, or set RAFTMQ_BIN)" >&2; exit 1; }

# The venv outlives the clone (like the cargo target dir); pip skips what is there.
if [ ! -x "$pyenv/bin/python" ]; then
  python3 -m venv "$pyenv"
fi
"$pyenv/bin/pip" install --quiet --disable-pip-version-check \
  grpcio==1.68.1 grpcio-tools==1.68.1 protobuf==5.29.3

data=$(mktemp -d)
out="$data/dev.out"
pid=""
cleanup() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  rm -rf "$data"
}
trap cleanup EXIT

"$bin" dev --data-dir "$data/cluster" --namesrv-listen 127.0.0.1:0 --broker-ports 0,0,0 >"$out" 2>"$data/dev.err" &
pid=$!
namesrv=""
for _ in $(seq 1 600); do
  namesrv=$(awk '/^  NameServer / { print $2 }' "$out" 2>/dev/null || true)
  [ -n "$namesrv" ] && break
  kill -0 "$pid" 2>/dev/null || { echo "raftmq dev exited early:" >&2; tail -20 "$data/dev.err" >&2; exit 1; }
  sleep 0.1
done
[ -n "$namesrv" ] || { echo "raftmq dev did not come up within 60 s" >&2; tail -20 "$data/dev.err" >&2; exit 1; }
echo "python-client-test: cluster up, NameServer $namesrv"

cd "$root/client/python"
"$pyenv/bin/python" -c "from raftmq_client import _stubs; _stubs.generate()"
"$pyenv/bin/python" ci_test.py "$namesrv"

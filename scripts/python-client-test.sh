#!/usr/bin/env bash
# The Python client's end-to-end test (CI runs it): a venv with pinned grpcio,
# grpcio-tools and protobuf from PyPI, stubs generated from proto/, then
# client/python/ci_test.py against a `raftmq dev` cluster on free loopback ports.
#
#   RAFTMQ_BIN     the raftmq binary (default: $CARGO_TARGET_DIR/debug/raftmq,
#                  CARGO_TARGET_DIR defaulting to /var/tmp/raftmq-target)
#   RAFTMQ_PYENV   the venv, made on first use and reused (default /var/tmp/raftmq-pyenv)
#   RAFTMQ_PYTHON  the interpreter that makes the venv (default python3.11, else python3)
#   RAFTMQ_CLIENT_AUTH  1: run client/python/auth_test.py against `raftmq dev --auth` instead
#                  (signed requests: with the admin's credentials served, without refused)
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

LABEL=python-client-test
# shellcheck source=scripts/dev-cluster.sh
. "$root/scripts/dev-cluster.sh"
# Transaction checks start after 1 s (not RocketMQ's 6 s) so the check-back step does
# not wait out the default.
if [ "${RAFTMQ_CLIENT_AUTH:-0}" = 1 ]; then
  dev_cluster_start --auth
  cd "$root/client/python"
  "$pyenv/bin/python" auth_test.py "$DEV_NAMESRV" "$DEV_DATA/cluster/admin-secret"
  exit 0
fi
dev_cluster_start --transaction-first-check-ms 1000 --transaction-check-interval-ms 1000
namesrv=$DEV_NAMESRV

cd "$root/client/python"
"$pyenv/bin/python" ci_test.py "$namesrv"

#!/usr/bin/env bash
# The README's run command: machine setup (libclang), the release binary, then a
# whole local cluster (NameServer + broker group broker-a of three replicas).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=$(bash scripts/build-release.sh)
exec "$bin" dev "$@"

#!/usr/bin/env bash
# The README's run command: machine setup (libclang), then a whole local cluster.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo run --release -- dev "$@"

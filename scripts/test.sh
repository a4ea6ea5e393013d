#!/usr/bin/env bash
# The README's test command: machine setup (libclang), then every test of the
# workspace (unit, integration, and the criterion benches in their quick test mode).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec cargo test --workspace --all-targets "$@"

#!/usr/bin/env bash
# Generates the gRPC stubs of proto/raftmq/v1 into raftmq/_gen/ (gitignored) with
# grpcio-tools. PYTHON picks the interpreter (default: python3), e.g.
#   PYTHON=/var/tmp/raftmq-pyenv/bin/python client/python/generate.sh
# Runs raftmq/_codegen.py as a script, so the package is not imported (and does
# not try to generate on import) while generating.
set -euo pipefail
cd "$(dirname "$0")"
exec "${PYTHON:-python3}" raftmq/_codegen.py "$@"

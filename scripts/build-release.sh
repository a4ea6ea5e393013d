#!/usr/bin/env bash
# Builds the one release binary everything outside the tests uses: `raftmq dev`,
# `raftmq bench`, and the FROM-scratch container image. Statically linked (glibc,
# libstdc++ and RocksDB inside) so the same file runs on the host and in an image
# with nothing else in it. RUSTFLAGS apply only to --target artifacts, so build
# scripts and proc-macros stay dynamic, as they must.
# Prints the binary's path on stdout (cargo's progress goes to stderr) and links it
# as ./raftmq in the project root, the name the README's tour uses.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}"
target=x86_64-unknown-linux-gnu
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --locked --target "$target" --bin raftmq >&2
bin="$CARGO_TARGET_DIR/$target/release/raftmq"
ln -sfn "$bin" raftmq
echo "$bin"

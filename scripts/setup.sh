#!/usr/bin/env bash
# One-time machine setup shared by the README's two commands and CI.
# Why: the rocksdb crate's bindgen needs libclang, which a fresh machine lacks.
# protoc is NOT installed here: proto/build.rs uses a vendored protoc from crates.io.
set -euo pipefail

have_libclang() {
  # libclang-cpp ships with other LLVM packages; bindgen needs libclang itself.
  ls /usr/lib/llvm-*/lib/libclang.so /usr/lib/llvm-*/lib/libclang-*.so.* \
    /usr/lib/x86_64-linux-gnu/libclang-*.so.* 2>/dev/null | grep -qv 'libclang-cpp' 
}

if ! have_libclang; then
  echo "setup: installing libclang-dev (needed by rocksdb's bindgen)" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq libclang-dev >/dev/null
fi

#!/usr/bin/env bash
# Builds the static release binary and the FROM-scratch image from it, in one command:
#
#     bash deploy/build-image.sh            # -> image raftmq:dev
#     IMAGE=raftmq:1.2 bash deploy/build-image.sh
#     RAFTMQ_BIN=/path/to/raftmq bash deploy/build-image.sh   # reuse a built binary
#     KEEP_DEBUG=1 bash deploy/build-image.sh                   # do not strip (see below)
#
# The binary comes from scripts/build-release.sh (glibc, libstdc++ and RocksDB linked
# statically; a cold build takes 20-35 minutes on 2 cores, later ones seconds). The
# docker build context is a throw-away directory holding only that binary, an empty
# data/ directory and nsswitch.conf: never the repository or the cargo target dir.
# Nothing is pulled (FROM scratch), so no registry is needed.
# Prints the image's size (from `docker image inspect`) at the end.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
image="${IMAGE:-raftmq:dev}"

if [[ -n "${RAFTMQ_BIN:-}" ]]; then
    bin="$RAFTMQ_BIN"
else
    bin="$(bash "$root/scripts/build-release.sh" | tail -n 1)"
fi
[[ -x "$bin" ]] || { echo "build-image: no executable binary at '$bin'" >&2; exit 1; }

# The compose cluster's Raft peer secret (mounted into every broker): made once,
# kept across image rebuilds, since the replicas' data outlives an image.
if [[ ! -s "$here/peer-secret" ]]; then
    rm -rf "$here/peer-secret"  # a directory docker made for a missing mount source
    (umask 077 && head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' > "$here/peer-secret")
    echo "build-image: wrote a new Raft peer secret to $here/peer-secret" >&2
fi
# The image runs as uid/gid 65532: let that group read the secret, or (when this
# user may not hand a file to that group) everyone on this host.
chgrp 65532 "$here/peer-secret" 2> /dev/null && chmod 0640 "$here/peer-secret" || chmod 0644 "$here/peer-secret"

stage="$(mktemp -d "${TMPDIR:-/tmp}/raftmq-image.XXXXXX")"
trap 'rm -rf "$stage"' EXIT
# The release profile keeps line tables, and RocksDB's C++ is compiled with -g, so the
# binary is ~480 MB of which ~455 MB is DWARF. The image gets a copy with the debug
# sections removed (~27 MB); the symbol table stays, so panics and backtraces still
# name functions (without file:line). KEEP_DEBUG=1 copies the binary unchanged.
if [[ "${KEEP_DEBUG:-0}" == 1 ]]; then
    cp "$bin" "$stage/raftmq"
else
    command -v strip > /dev/null 2>&1 || { echo "build-image: 'strip' (binutils) not found; install it or set KEEP_DEBUG=1" >&2; exit 1; }
    strip --strip-debug -o "$stage/raftmq" "$bin"
fi
mkdir -p "$stage/data" "$stage/rootfs/etc"
printf 'hosts: files dns\n' > "$stage/rootfs/etc/nsswitch.conf"

# The release binary is static and needs nothing else. A dynamically linked one (CI
# reuses the debug build of its test run rather than compiling RocksDB a second
# time) would fail in a scratch image with a bare "no such file or directory", so
# its ELF interpreter and shared libraries go into the image at their own paths.
if readelf -l "$bin" 2> /dev/null | grep -q 'Requesting program interpreter'; then
    echo "build-image: $bin is dynamically linked; adding its loader and libraries" >&2
    for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
        mkdir -p "$stage/rootfs$(dirname "$lib")"
        cp -L "$lib" "$stage/rootfs$lib"
    done
fi

echo "build-image: building $image from $bin ($(du -h "$bin" | cut -f1); in the image $(du -h "$stage/raftmq" | cut -f1))" >&2
docker build --file "$here/Dockerfile" --tag "$image" "$stage" >&2

# Smoke test: the image runs on its own (no shell, no libraries needed).
docker run --rm --network none "$image" --version >&2

size="$(docker image inspect --format '{{.Size}}' "$image")"
echo "build-image: $image is $size bytes ($(( (size + 524288) / 1048576 )) MiB)" >&2
echo "$image $size"

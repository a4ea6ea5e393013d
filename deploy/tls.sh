#!/usr/bin/env bash
# The compose cluster with TLS everywhere (deploy/docker-compose.tls.yml on top of
# deploy/docker-compose.yml), its certificates made at up time:
#
#     bash deploy/tls.sh up [compose args...]     # certificates if absent, then up -d
#     bash deploy/tls.sh down [compose args...]   # down -v (the replicas' volumes too)
#     bash deploy/tls.sh certs                    # (re)make the certificates only
#     bash deploy/tls.sh compose ps               # any compose command with both files
#
# Certificates go to deploy/tls/ (ignored by git, never committed): ca.pem (give
# it to clients: --tls-ca-file deploy/tls/ca.pem), node.pem and node.key, from
# `raftmq tls gen`, run from $RAFTMQ_BIN, ./raftmq, or the image itself (no shell
# needed: the binary writes the files). They are made once and kept, so clients
# keep trusting the same ca.pem; `certs` makes a new set (restart every container
# and hand clients the new ca.pem then).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
image="${RAFTMQ_IMAGE:-raftmq:dev}"
out="$here/tls"
# Every name and address a client, a peer or a health check dials.
hosts="127.0.0.1,localhost"
hosts+=",namesrv-1,namesrv-2,172.29.53.11,172.29.53.12"
for g in a b; do
    for i in 1 2 3; do
        hosts+=",broker-$g-$i"
    done
done
hosts+=",172.29.53.21,172.29.53.22,172.29.53.23,172.29.53.31,172.29.53.32,172.29.53.33"

compose() {
    if command -v docker-compose > /dev/null 2>&1; then
        docker-compose -f "$here/docker-compose.yml" -f "$here/docker-compose.tls.yml" "$@"
    else
        docker compose -f "$here/docker-compose.yml" -f "$here/docker-compose.tls.yml" "$@"
    fi
}

make_certs() {
    mkdir -p "$out"
    local bin="${RAFTMQ_BIN:-$root/raftmq}"
    if [[ -x "$bin" ]]; then
        "$bin" tls gen --out "$out" --hosts "$hosts"
    else
        # The image runs as 65532 by default; write as this user so the files are ours.
        docker run --rm --network none --user "$(id -u):$(id -g)" -v "$out:/out" "$image" \
            tls gen --out /out --hosts "$hosts"
    fi
    # The containers run as uid/gid 65532: let that group read the key, or (when
    # this user may not hand a file to that group) everyone on this host, as
    # build-image.sh does for the peer secret.
    chgrp 65532 "$out/node.key" 2> /dev/null && chmod 0640 "$out/node.key" || chmod 0644 "$out/node.key"
    echo "tls.sh: certificates in $out (clients: --tls-ca-file $out/ca.pem)" >&2
}

cmd="${1:-up}"
shift || true
case "$cmd" in
    up)
        [[ -s "$out/ca.pem" && -s "$out/node.pem" && -s "$out/node.key" ]] || make_certs
        [[ -s "$here/peer-secret" ]] || { echo "tls.sh: no deploy/peer-secret; run deploy/build-image.sh first" >&2; exit 1; }
        compose up -d "$@"
        echo "tls.sh: up. Try: ./raftmq admin cluster --namesrv 172.29.53.11:9876 --tls-ca-file $out/ca.pem" >&2
        ;;
    down) compose down -v "$@" ;;
    certs) make_certs ;;
    compose) compose "$@" ;;
    *) echo "usage: $0 up|down|certs|compose ARGS..." >&2; exit 2 ;;
esac

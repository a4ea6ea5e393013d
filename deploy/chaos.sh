#!/usr/bin/env bash
# The chaos suite (`raftmq chaos`) against the compose cluster of this directory:
# builds the image, starts two NameServers and two broker groups (broker-a and
# broker-b, three replicas each), runs producers (plain and keyed) and consumers
# over topics with queues on both groups while killing, pausing and isolating
# the leaders and followers of both groups (the faults take turns over the
# groups), checks the history across both, and tears the cluster down (volumes
# included).
# Beside them run delayed messages (due 1-20 s after sending, on their own topic),
# a two-member POP group (SimpleConsumer, 5 s invisible time, 1 message in 20
# deliberately left unacked once) on a third topic, and transactions on a fourth
# (a half message, then commit for even numbers and rollback for odd ones; every
# fifth left unknown for the brokers' check-backs, which the producer's checker
# answers by the same rule). The brokers run with docker-compose.chaos.yml on top
# of docker-compose.yml: transaction check-backs 2 s after a half message and
# every 2 s after that.
#
#     bash deploy/chaos.sh smoke    # ~3 min: 7 faults, 3 of them leader SIGKILLs (both groups)
#     bash deploy/chaos.sh long     # ~22 min: a fault every 30 s for 20 min (release check)
#     bash deploy/chaos.sh failover # ~4 min: 25 leader SIGKILLs, 8 s apart (kill -> first ack)
#     bash deploy/chaos.sh silence  # ~3 min: 10 leaders paused or cut off, 14 s apart
#     RAFTMQ_BIN=/path/to/raftmq bash deploy/chaos.sh smoke   # reuse a built binary
#
# Exit status: 0 when nothing acknowledged was lost, nothing unexpected was read,
# no per-key order was broken, no delayed message fired early, twice or never
# (timers_early/_twice/_never; late ones, timers_late, are only a warning), and
# the POP group lost nothing acknowledged (pop_lost) and got nothing back after
# a confirmed ack (pop_redelivered_after_ack, pop_stale_ack_ok) or before its
# invisible time (pop_redelivered_early), and no transaction the rule commits is
# missing (txn_committed_missing) nor one it rolls back present
# (txn_rolled_back_present), no committed message is read twice
# (txn_same_id_twice) and nothing unexpected is read (txn_unexpected); 1
# otherwise. The JSON summary goes to $CHAOS_OUT (default
# /tmp/raftmq-chaos-<mode>.json).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/.." && pwd)"
mode="${1:-smoke}"
[[ $# -gt 0 ]] && shift

case "$mode" in
  smoke) schedule=(--duration 100 --interval 14 --hold 4) ;;
  long) schedule=(--duration 1200 --interval 30 --hold 6) ;;
  failover) schedule=(--duration 200 --interval 8 --hold 3 --faults kill-leader) ;;
  silence) schedule=(--duration 140 --interval 14 --hold 4 --faults pause-leader,isolate-leader) ;;
  *) echo "usage: $0 smoke|long|failover|silence [raftmq chaos options]" >&2; exit 2 ;;
esac

bin="${RAFTMQ_BIN:-$(bash "$root/scripts/build-release.sh")}"
RAFTMQ_BIN="$bin" bash "$here/build-image.sh" > /dev/null

files=(-f "$here/docker-compose.yml" -f "$here/docker-compose.chaos.yml")
if docker compose version > /dev/null 2>&1; then
  compose=(docker compose "${files[@]}")
else
  compose=(docker-compose "${files[@]}")
fi
down() { "${compose[@]}" down -v --remove-orphans > /dev/null 2>&1 || true; }
trap down EXIT
down
"${compose[@]}" up -d

namesrv="172.29.53.11:9876,172.29.53.12:9876"
deadline=$((SECONDS + 90))
groups=(broker-a broker-b)
# Every group must have a leader before the run: `admin cluster` prints one
# "<group>  leader N ..." line per group that has one.
until [ "$("$bin" admin cluster --namesrv "$namesrv" 2> /dev/null | grep -cE "^($(IFS='|'; echo "${groups[*]}")) .*leader [0-9]")" -ge "${#groups[@]}" ]; do
  if ((SECONDS > deadline)); then
    echo "chaos: no leader for each of ${groups[*]} within 90 s" >&2
    "${compose[@]}" ps >&2 || true
    exit 1
  fi
  sleep 1
done
"$bin" admin cluster --namesrv "$namesrv"

out="${CHAOS_OUT:-/tmp/raftmq-chaos-$mode.json}"
RUST_LOG="${RUST_LOG:-error}" "$bin" chaos --namesrv "$namesrv" --project raftmq "${schedule[@]}" --out "$out" "$@"

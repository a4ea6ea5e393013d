#!/usr/bin/env bash
# The backlog run of issues #6 and #18 (not part of CI: it writes gigabytes and takes
# minutes to an hour). Starts `raftmq dev` on fixed loopback ports with its data under
# $DATA_DIR, stores $COUNT messages of $SIZE bytes with `raftmq bench produce`
# ($INFLIGHT in flight), then compares the produce rate of the first and last ten
# seconds, prints each replica's RSS and the groups' storage (bytes, segments, oldest
# message, retention horizon), restarts the whole cluster on that backlog, and times
# how long until a send succeeds again. Deletes $DATA_DIR at the end unless KEEP=1.
#   COUNT=100000000 SIZE=128 RETENTION_MAX_BYTES=8589934592 bash scripts/backlog-run.sh
# is #18's 10^8-message run: RETENTION_MAX_BYTES caps each group's retained log (the
# brokers read it as RAFTMQ_RETENTION__MAX_BYTES), so the disk holds what is retained,
# not all 10^8 messages, and retention runs under the load.
set -euo pipefail
cd "$(dirname "$0")/.."
count="${COUNT:-10000000}"
size="${SIZE:-1024}"
inflight="${INFLIGHT:-1024}"
if [ -n "${RETENTION_MAX_BYTES:-}" ]; then
  export RAFTMQ_RETENTION__MAX_BYTES="$RETENTION_MAX_BYTES"
  # Look often: at this rate a segment (128 MiB) fills in seconds.
  export RAFTMQ_RETENTION__CHECK_INTERVAL="${RETENTION_CHECK_INTERVAL:-2s}"
fi
dir="${DATA_DIR:-/var/tmp/raftmq-backlog}"
ns=127.0.0.1:19890
ports=19891,19892,19893
bin="$(bash scripts/build-release.sh)"
[ -e "$dir" ] && { echo "backlog-run: $dir exists; remove it or set DATA_DIR" >&2; exit 1; }
mkdir -p "$dir"
pid=""
stop() {
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid"
    wait "$pid" 2>/dev/null || true
  fi
  pid=""
}
cleanup() {
  stop
  [ "${KEEP:-0}" = 1 ] || rm -rf "$dir"
}
trap cleanup EXIT
start() {
  "$bin" dev --data-dir "$dir/cluster" --namesrv-listen "$ns" --broker-ports "$ports" >>"$dir/dev.out" 2>>"$dir/dev.err" &
  pid=$!
}
# One message through the client: true once the cluster serves writes.
serving() { "$bin" produce --namesrv "$ns" --topic Backlog --count 1 --size 1024 >/dev/null 2>&1; }

start
for _ in $(seq 1 600); do serving && break; sleep 0.1; done
"$bin" admin topic create --namesrv "$ns" --topic Backlog --queues 8 >/dev/null
# SAMPLE=DIR: record what the machine does each second (dirty pages, disk writes,
# RocksDB background CPU; scripts/backlog-sample.py) next to the produce rate, in DIR.
sampler=""
if [ -n "${SAMPLE:-}" ]; then
  mkdir -p "$SAMPLE"
  python3 scripts/backlog-sample.py "$dir"/cluster/*.pid >"$SAMPLE/sample.tsv" &
  sampler=$!
fi
"$bin" bench produce --namesrv "$ns" --topic Backlog --count "$count" --size "$size" --inflight "$inflight" \
  --duration 7200 2>"$dir/progress.log" | tail -4
# Progress lines: "[produce   12.0s]   123456 ok     45678 msgs/s  0 errors".
awk '/msgs\/s/ { for (i = 1; i <= NF; i++) if ($(i+1) == "msgs/s") r[n++] = $i }
  END {
    if (n < 25) { print "backlog-run: too few progress lines (" n ")"; exit 1 }
    for (i = 1; i <= 10; i++) a += r[i]; for (i = n - 11; i < n - 1; i++) b += r[i]
    printf "produce rate, seconds 2-11: %.0f msgs/s; last ten full seconds: %.0f msgs/s (%+.1f%%)\n", a / 10, b / 10, (b - a) * 100 / a
    # Ten seconds can fall into one of the periodic RocksDB compaction dips (every 30-60 s at
    # this rate); a minute at each end averages over them.
    if (n >= 130) {
      for (i = 1; i <= 60; i++) c += r[i]; for (i = n - 61; i < n - 1; i++) d += r[i]
      printf "produce rate, seconds 2-61: %.0f msgs/s; last sixty full seconds: %.0f msgs/s (%+.1f%%)\n", c / 60, d / 60, (d - c) * 100 / c
    }
  }' "$dir/progress.log"
if [ -n "$sampler" ]; then
  kill "$sampler" 2>/dev/null || true
  cp "$dir/progress.log" "$SAMPLE/progress.log"
  echo "backlog-run: per-second samples in $SAMPLE/sample.tsv, produce progress in $SAMPLE/progress.log"
fi
du -sh "$dir/cluster" | awk '{ print "data on disk (3 replicas): " $1 }'
for f in "$dir"/cluster/*.pid; do
  p=$(cat "$f")
  echo "$(basename "$f" .pid): RSS $(awk '/^VmRSS/ { printf "%.0f MiB", $2 / 1024 }' "/proc/$p/status" 2>/dev/null || echo '?')"
done
"$bin" admin cluster --namesrv "$ns" | grep -i "storage" || true
stop
t0=$(date +%s.%N)
start
until serving; do
  kill -0 "$pid" 2>/dev/null || { echo "backlog-run: dev exited on restart" >&2; tail "$dir/dev.err" >&2; exit 1; }
  sleep 0.05
done
t1=$(date +%s.%N)
echo "restart with the backlog: serving sends again after $(echo "$t1 - $t0" | bc) s"
"$bin" admin cluster --namesrv "$ns" | head -5

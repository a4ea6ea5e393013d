# Sourced (not run) by the scripts that test a client against a `raftmq dev` cluster on
# loopback (python-client-test.sh, rocketmq-python-sdk-test.sh, rocketmq-rust-sdk-test.sh):
# the one way they start it on free ports, wait until it is up, and stop it by its PID
# whatever happens, so the three cannot drift apart.
#
# Before `dev_cluster_start [extra raftmq dev args...]` (e.g. `--groups 2` for two
# broker groups; every replica's port is picked free whatever the count), set:
#   LABEL   prefix of this script's messages (e.g. rocketmq-rust-sdk-test)
#   bin     the raftmq binary
# and optionally define `dev_cluster_on_failure`, called on a non-zero exit before the
# data dir is removed (e.g. to show a client's own log), and `dev_cluster_before_stop`,
# called on every exit before the cluster is stopped (e.g. to stop, by its PID, a
# server the script started against the cluster).
# After it returns:
#   DEV_DATA     the data dir (the cluster's under $DEV_DATA/cluster; removed at exit)
#   DEV_PID      the `raftmq dev` process
#   DEV_NAMESRV  the NameServer's HOST:PORT
#   DEV_NODES    "ID=HOST:PORT,..." of the broker replicas, DEV_PIDS "ID=PID,..."
#                (with several groups, every group's; node ids repeat per group)
#   DEV_ACCESS   the first replica's HOST:PORT (every node serves every client API)
# and `stop_pid PID SECONDS` stops another process of the script's the same way
# (SIGTERM, then up to SECONDS for it to exit; non-zero if it did not).

# SIGTERM to a process, then up to SECONDS for it to exit; non-zero if it is still there.
stop_pid() {
  local pid=$1 seconds=$2
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 $((seconds * 10))); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.1
  done
  ! kill -0 "$pid" 2>/dev/null
}

dev_cluster_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if declare -F dev_cluster_before_stop >/dev/null; then
    dev_cluster_before_stop || true
  fi
  if [ -n "${DEV_PID:-}" ]; then
    # `raftmq dev` stops its replicas on SIGTERM; give it 30 s before SIGKILL.
    if ! stop_pid "$DEV_PID" 30; then
      echo "$LABEL: raftmq dev (pid $DEV_PID) ignored SIGTERM; killing it and its replicas" >&2
      kill -KILL "$DEV_PID" 2>/dev/null || true
      # Its replicas are processes of their own; their pids are in the data dir.
      for f in "$DEV_DATA"/cluster/*.pid; do
        [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true
      done
    fi
    wait "$DEV_PID" 2>/dev/null || true
  fi
  if [ "$rc" -ne 0 ]; then
    if [ -s "${DEV_DATA:-}/dev.err" ]; then
      echo "$LABEL: last lines of raftmq dev's stderr:" >&2
      tail -20 "$DEV_DATA/dev.err" >&2 || true
    fi
    if declare -F dev_cluster_on_failure >/dev/null; then
      dev_cluster_on_failure || true
    fi
  fi
  [ -n "${DEV_DATA:-}" ] && rm -rf "$DEV_DATA"
  exit "$rc"
}

dev_cluster_start() {
  DEV_DATA=$(mktemp -d "${TMPDIR:-/tmp}/raftmq-$LABEL.XXXXXX")
  DEV_PID=""
  trap dev_cluster_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  local out="$DEV_DATA/dev.out"
  # Loopback only: the NameServer and the replicas on 127.0.0.1 (dev's default), every
  # port picked free by the OS.
  "$bin" dev --data-dir "$DEV_DATA/cluster" --namesrv-listen 127.0.0.1:0 --broker-ports 0 "$@" \
    >"$out" 2>"$DEV_DATA/dev.err" &
  DEV_PID=$!
  # `raftmq dev` prints "  NameServer        127.0.0.1:PORT" once every group has a
  # leader, then one "  broker-a node N  HOST:PORT  pid P  log FILE  (role)" line per
  # replica, and ends with a line saying "Ctrl-C stops the cluster".
  local nodes=0 deadline=$((SECONDS + 60))
  DEV_NAMESRV=""
  while :; do
    DEV_NAMESRV=$(awk '$1 == "NameServer" { print $2; exit }' "$out" 2>/dev/null || true)
    nodes=$(awk '$2 == "node" && $5 == "pid" { n++ } END { print n + 0 }' "$out" 2>/dev/null || echo 0)
    [ -n "$DEV_NAMESRV" ] && [ "$nodes" -ge 3 ] && grep -q 'Ctrl-C stops the cluster' "$out" 2>/dev/null && break
    kill -0 "$DEV_PID" 2>/dev/null || { echo "$LABEL: raftmq dev exited before the cluster was up" >&2; exit 1; }
    [ "$SECONDS" -lt "$deadline" ] || { echo "$LABEL: raftmq dev did not come up within 60 s" >&2; exit 1; }
    sleep 0.1
  done
  DEV_NODES=$(awk '$2 == "node" && $5 == "pid" { printf "%s%s=%s", sep, $3, $4; sep = "," }' "$out")
  DEV_PIDS=$(awk '$2 == "node" && $5 == "pid" { printf "%s%s=%s", sep, $3, $6; sep = "," }' "$out")
  DEV_ACCESS=$(awk '$2 == "node" && $5 == "pid" { print $4; exit }' "$out")
  echo "$LABEL: cluster up (pid $DEV_PID), NameServer $DEV_NAMESRV, nodes $DEV_NODES (pids $DEV_PIDS)"
}

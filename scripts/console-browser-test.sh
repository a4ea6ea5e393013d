#!/usr/bin/env bash
# The web console in a real headless browser (CI runs it): Debian's chromium driven by
# Playwright from PyPI (its own browser download is never used: nothing but the package
# registries is reachable), against `raftmq console` serving a `raftmq dev` cluster on
# free loopback ports. tests/console/browser_test.py checks that every page loads with
# no console error, that a topic created in the UI (confirm dialog accepted) is in
# `raftmq admin topic list`, that a message sent with `raftmq produce` is found by its
# id in the UI, and that the lag a group shows is `raftmq admin group describe`'s; it
# screenshots every page.
#
#   RAFTMQ_BIN             the raftmq binary (default: $CARGO_TARGET_DIR/debug/raftmq,
#                          CARGO_TARGET_DIR defaulting to /var/tmp/raftmq-target)
#   RAFTMQ_CONSOLE_PYENV   the venv, made on first use and reused (default /var/tmp/raftmq-console-venv)
#   RAFTMQ_PYTHON          the interpreter that makes the venv (default python3.11, else python3)
#   RAFTMQ_CONSOLE_SHOTS   where the screenshots go (default $CARGO_TARGET_DIR/console-shots);
#                          emptied first, kept after the run, printed at the end
#   RAFTMQ_CHROMIUM        the browser (default: chromium from PATH, installed with apt if missing)
#
# The console and the cluster are stopped by their PIDs whatever happens, and the data
# dir removed.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

PLAYWRIGHT_VERSION=1.65.2

target="${CARGO_TARGET_DIR:-/var/tmp/raftmq-target}"
bin="${RAFTMQ_BIN:-$target/debug/raftmq}"
pyenv="${RAFTMQ_CONSOLE_PYENV:-/var/tmp/raftmq-console-venv}"
shots="${RAFTMQ_CONSOLE_SHOTS:-$target/console-shots}"
[ -x "$bin" ] || { echo "console-browser-test: no raftmq binary at $bin (build it first, or set RAFTMQ_BIN)" >&2; exit 1; }

# Debian's chromium, installed as scripts/setup.sh installs its package; a font so the
# screenshots have text.
if [ -z "${RAFTMQ_CHROMIUM:-}" ] && ! command -v chromium >/dev/null 2>&1; then
  echo "console-browser-test: installing chromium (Debian's) for the headless browser test" >&2
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium fonts-dejavu-core >/dev/null
fi
chromium="${RAFTMQ_CHROMIUM:-$(command -v chromium)}"

# Playwright only as the driver (its pip package carries it); the browser is Debian's.
# shellcheck source=scripts/pinned-venv.sh
. "$root/scripts/pinned-venv.sh"
pinned_venv console-browser-test "$pyenv" playwright "$PLAYWRIGHT_VERSION" || exit 1

LABEL=console-browser-test
CONSOLE_PID=""
# shellcheck source=scripts/dev-cluster.sh
. "$root/scripts/dev-cluster.sh"
dev_cluster_before_stop() {
  if [ -n "$CONSOLE_PID" ]; then
    stop_pid "$CONSOLE_PID" 10 || kill -KILL "$CONSOLE_PID" 2>/dev/null || true
    wait "$CONSOLE_PID" 2>/dev/null || true
  fi
}
dev_cluster_on_failure() {
  if [ -s "$DEV_DATA/console.err" ]; then
    echo "$LABEL: last lines of raftmq console's stderr:" >&2
    tail -20 "$DEV_DATA/console.err" >&2 || true
  fi
}
# Signed requests on (#20): the console's reads and the test's CLI calls sign as the
# bootstrap admin (environment), while a change made in the page carries only the
# credential typed into it.
dev_cluster_start --auth
namesrv=$DEV_NAMESRV
export RAFTMQ_ACCESS_KEY=admin RAFTMQ_SECRET_FILE="$DEV_DATA/cluster/admin-secret"

# The console on a free port; it prints the address it took.
"$bin" console --namesrv "$namesrv" --listen 127.0.0.1:0 >"$DEV_DATA/console.out" 2>"$DEV_DATA/console.err" &
CONSOLE_PID=$!
url=""
deadline=$((SECONDS + 30))
while [ -z "$url" ]; do
  url=$(awk '/^console listening on / { print $4; exit }' "$DEV_DATA/console.out" 2>/dev/null || true)
  [ -n "$url" ] && break
  kill -0 "$CONSOLE_PID" 2>/dev/null || { echo "$LABEL: raftmq console exited before serving" >&2; exit 1; }
  [ "$SECONDS" -lt "$deadline" ] || { echo "$LABEL: raftmq console did not start within 30 s" >&2; exit 1; }
  sleep 0.1
done
echo "$LABEL: console at $url (pid $CONSOLE_PID), chromium $chromium"

rm -rf "$shots"
mkdir -p "$shots"
# The test bounds every wait itself; `timeout` only stops one that hangs anyway.
rc=0
timeout 600 "$pyenv/bin/python" "$root/tests/console/browser_test.py" \
  --url "$url" --bin "$bin" --namesrv "$namesrv" --chromium "$chromium" --shots "$shots" \
  --admin-secret-file "$RAFTMQ_SECRET_FILE" || rc=$?
echo "$LABEL: screenshots in $shots"
exit "$rc"

# Sourced (not run) by the scripts that test with one pinned package from PyPI in a venv
# of its own (rocketmq-python-sdk-test.sh, console-browser-test.sh): the one way they
# make the venv (outside the clone, so it outlives it like the cargo target dir) and
# install the package, asking PyPI only when that version is not installed yet, so a
# rerun asks no registry anything.
#
#   pinned_venv LABEL VENV PACKAGE VERSION
#
# LABEL prefixes its messages; the venv is made with $RAFTMQ_PYTHON, else python3.11,
# else python3 (3.9 or newer). Returns non-zero when it cannot.
pinned_venv() {
  local label=$1 venv=$2 package=$3 version=$4 python
  if [ ! -x "$venv/bin/python" ]; then
    python="${RAFTMQ_PYTHON:-$(command -v python3.11 || command -v python3)}"
    "$python" -c 'import sys; sys.exit(sys.version_info < (3, 9))' \
      || { echo "$label: $python is older than 3.9" >&2; return 1; }
    "$python" -m venv "$venv" || return 1
  fi
  if ! "$venv/bin/python" -c 'import importlib.metadata as m, sys; sys.exit(m.version(sys.argv[1]) != sys.argv[2])' \
    "$package" "$version" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "$package==$version" || return 1
  fi
}

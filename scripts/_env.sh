# Shared set-up for scripts/*: a project virtualenv with everything installed, created on first use.
# shellcheck shell=bash
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${IMU_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

# The Debian packages whose program is missing, one per line, each once. Arguments are
# PROGRAM:PACKAGE, PROGRAM a name on PATH or an absolute path.
missing_packages() {
  local pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null || echo "${pair#*:}"
  done | sort -u
}

# apt_install WHY PACKAGE...: install them with apt-get when run as root (a failed install
# stops the script); returns 1, installing nothing, where it cannot.
apt_install() {
  local why="$1"
  shift
  [ "$#" -gt 0 ] || return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || return 1
  echo "installing $* ($why) ..." >&2
  { apt-get update -qq >/dev/null && apt-get install -y -qq "$@" >/dev/null; } || {
    echo "error: apt-get could not install $*" >&2
    exit 1
  }
}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "error: Python >= 3.11 is required (found: $("$PYTHON" --version 2>&1))" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV ..." >&2
  "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "installing the project and its tools into $VENV ..." >&2
  python -m pip install --quiet --upgrade pip >/dev/null
  python -m pip install --quiet -e ".[dev]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

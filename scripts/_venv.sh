# Sourced by the scripts: make ./.venv with the project installed in it (again only when pyproject.toml
# changed), using the Python 3.11+ on PATH. Works on a fresh clone of a fresh machine with registry access.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
extras="${CACHELAYERS_EXTRAS:-dev}"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "cachelayers needs Python >= 3.11 as '$python' (set PYTHON=...)" >&2
  exit 1
fi
if ! "$python" -c 'import venv, ensurepip' 2>/dev/null; then
  echo "installing python3-venv" >&2
  apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
fi
stamp=".venv/.installed-$extras-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  [ -x .venv/bin/python ] || "$python" -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  echo "installing cachelayers[$extras] into .venv ..." >&2
  .venv/bin/python -m pip install -q -e ".[$extras]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import cachelayers" # fail loudly if the install did not work
  rm -f .venv/.installed-* && touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"

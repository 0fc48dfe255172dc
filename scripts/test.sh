#!/usr/bin/env bash
# Install everything the tests need (first run only) and run the whole check: lint, types,
# tests. CI (.ci/run) runs exactly this. Extra arguments go to pytest.
source "$(dirname "$0")/_env.sh"
apt_install dcmtk postgresql chromium  # chromium: tests/test_ui.py
install_orthanc          # Debian's Orthanc 1.10 for tests/test_orthanc_interop.py
ensure_venv "[test]"
npm_install tests/fhir   # Medplum FHIR validator for tests/test_fhir_maps.py
npm_install tests/oauth  # oidc-provider, the OAuth2 server of tests/fhir_servers.py
install_sekmet           # sekmet-fhir, the FHIR server of tests/fhir_servers.py
install_helm             # helm, for tests/test_helm.py
cd "$ROOT"
echo "== ruff" >&2
"$VENV/bin/ruff" check gateway fhir_maps tests bench
echo "== mypy" >&2
"$VENV/bin/mypy" gateway fhir_maps
echo "== pytest" >&2
exec "$VENV/bin/pytest" -p no:cacheprovider "$@"

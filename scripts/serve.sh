#!/usr/bin/env bash
# Install the gateway (first run only) and start it on its embedded default: SQLite index and
# files under ./data, DICOM on port 11112 (AE title IMAGING_GW), HTTP on 8080.
# Usage: scripts/serve.sh [--config FILE]      (any GATEWAY_<SECTION>_<KEY> variable applies)
source "$(dirname "$0")/_env.sh"
ensure_venv ""
cd "$ROOT"
exec "$VENV/bin/imaging-gateway" serve "$@"

#!/usr/bin/env bash
# Install the benchmark peers from Debian packages: dcmtk (storescu/storescp/echoscu),
# Orthanc 1.10 and its DICOMweb plugin. Idempotent. Starts nothing: if the orthanc
# package's own service is running afterwards, it is stopped and disabled, because the
# benchmark harness (python -m bench) starts its own Orthanc with its own config.
# Needs root (apt-get). Python-side needs (numpy, psutil) come from the project's
# test extras: pip install -e '.[test]'.
set -euo pipefail

PKGS=(dcmtk orthanc orthanc-dicomweb)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done

if [ "${#missing[@]}" -gt 0 ]; then
  # Only refresh the package lists when apt has no candidate for orthanc (fresh machine).
  if apt-cache policy orthanc 2>/dev/null | grep -q 'Candidate: (none)' \
     || ! apt-cache policy orthanc 2>/dev/null | grep -q 'Candidate:'; then
    apt-get update -q
  fi
  # policy-rc.d exit 101 keeps invoke-rc.d from starting orthanc's packaged service.
  prc=/usr/sbin/policy-rc.d
  own_prc=0
  if [ ! -e "$prc" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$prc" && chmod +x "$prc" && own_prc=1
  fi
  trap 'if [ "$own_prc" = 1 ]; then rm -f "$prc"; fi' EXIT
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Belt and braces: whatever the package did, leave its service stopped and disabled.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
  systemctl stop orthanc >/dev/null 2>&1 || true
  systemctl disable orthanc >/dev/null 2>&1 || true
fi
service orthanc stop >/dev/null 2>&1 || true
update-rc.d orthanc disable >/dev/null 2>&1 || true

# First line of a command's output, or "missing" (no pipefail: head closes the pipe early).
first_line() { local out; out=$("$@" 2>/dev/null) || true; echo "${out%%$'\n'*}" | grep . || echo missing; }
echo "dcmtk:    $(first_line storescu --version)"
echo "orthanc:  $(first_line Orthanc --version)"
echo "dicomweb: $(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so 2>/dev/null || echo missing)"

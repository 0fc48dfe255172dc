#!/usr/bin/env bash
# Install the benchmark peers: from Debian packages dcmtk (storescu/storescp/echoscu),
# Orthanc 1.10 and its DICOMweb plugin; from PyPI sekmet-fhir (the FHIR server of the publish
# measure, in .infra/sekmet-venv as for the tests). Idempotent. Starts nothing: if the orthanc
# package's own service is running afterwards, it is stopped and disabled, because the
# benchmark harness (python -m bench) starts its own Orthanc with its own config.
# Needs root (apt-get). Python-side needs (numpy, psutil) come from the project's
# test extras: pip install -e '.[test]'.
source "$(dirname "$0")/_env.sh"

apt_install dcmtk
install_orthanc orthanc-dicomweb  # scripts/_env.sh: keeps the packaged service from starting
stop_orthanc_service              # also when Orthanc was installed before
install_sekmet                    # the publish measure's FHIR server (bench/sekmet.py)

# First line of a command's output, or "missing" (no pipefail: head closes the pipe early).
first_line() { local out; out=$("$@" 2>/dev/null) || true; echo "${out%%$'\n'*}" | grep . || echo missing; }
echo "dcmtk:    $(first_line storescu --version)"
echo "orthanc:  $(first_line Orthanc --version)"
echo "dicomweb: $(ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so 2>/dev/null || echo missing)"
stamp=$(ls "$ROOT"/.infra/sekmet-venv/.installed-* 2>/dev/null || echo missing)
echo "sekmet:   ${stamp##*installed-}"

#!/usr/bin/env bash
# One-shot set-up used by `make demo` and `make test`:
#  - Debian packages (dcmtk, dicom3tools, orthanc, gdcm tools, chromium for the dsr2html screenshot test,
#    strace for the hostile-corpus check that the node connects to nothing but loopback)
#    when running as root and missing;
#  - a virtualenv in .venv with torch 2.13.0 (CPU build from local disk) installed BEFORE the extras,
#    so that no multi-GB CUDA build is pulled in;
#  - the project itself in editable mode with the extras for the node, training, export and tests,
#    at the versions of constraints.txt (the ones the suite was last run with).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=""
for tool in storescu dciodvfy Orthanc gdcmconv chromium strace; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_apt=1
done
if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing Debian packages dcmtk dicom3tools orthanc libgdcm-tools chromium strace"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      dcmtk dicom3tools orthanc libgdcm-tools chromium strace >/dev/null
    # The Debian package starts a system Orthanc on 4242/8042; our tests and demo start their own.
    (service orthanc stop || systemctl stop orthanc || true) >/dev/null 2>&1
  else
    echo "setup: WARNING: dcmtk/dicom3tools/orthanc/strace missing and not root; tests needing them will be skipped" >&2
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
stamp="$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing torch==2.13.0 (CPU build) and the project with extras [cpu,train,export,test]"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[cpu,train,export,test]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

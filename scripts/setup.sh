#!/usr/bin/env bash
# One-shot set-up used by `make demo` and `make test`:
#  - Debian packages (dcmtk, dicom3tools, orthanc, gdcm tools, chromium for the dsr2html screenshot test,
#    chromium-driver for the worklist browser test; strace for the hostile-corpus check that the node connects to nothing but loopback)
#    when running as root and missing;
#  - a virtualenv in .venv with torch 2.13.0 (CPU build from local disk) installed BEFORE the extras,
#    so that no multi-GB CUDA build is pulled in;
#  - the project itself in editable mode with the extras for the node, training, export, tests and the
#    Triton client, at the versions of constraints.txt (the ones the suite was last run with);
#  - a second virtualenv .venv-triton of Debian's /usr/bin/python3.11 with the Triton Inference Server
#    binary (nvidia-pytriton) for the Triton tests and benchmark (scripts/triton-server-requirements.txt):
#    its Python backend stub needs the shared libpython3.11 that only Debian's python3.11 has here.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

need_apt=""
for tool in storescu dciodvfy Orthanc gdcmconv chromium chromedriver strace; do
  command -v "$tool" >/dev/null 2>&1 || [ -x "/usr/sbin/$tool" ] || need_apt=1
done
if [ -n "$need_apt" ]; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing Debian packages dcmtk dicom3tools orthanc libgdcm-tools chromium chromium-driver strace"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      dcmtk dicom3tools orthanc libgdcm-tools chromium chromium-driver strace >/dev/null
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
  echo "setup: installing torch==2.13.0 (CPU build) and the project with extras [cpu,train,export,test,triton]"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q -c constraints.txt -e ".[cpu,train,export,test,triton]"
  rm -f "$VENV"/.installed-*
  touch "$stamp"
fi

# The Triton server venv (tests/model/test_triton_*.py, benchmarks/triton.py). Debian's python3.11 with
# its venv module and shared libpython first (root installs them when missing).
TRITON_VENV=${TRITON_VENV:-.venv-triton}
if [ ! -x /usr/bin/python3.11 ] || [ ! -e /usr/lib/x86_64-linux-gnu/libpython3.11.so.1.0 ] \
   || ! /usr/bin/python3.11 -c "import ensurepip" >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    echo "setup: installing Debian packages python3.11 python3.11-venv libpython3.11"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3.11 python3.11-venv libpython3.11 >/dev/null
  else
    echo "setup: WARNING: Debian python3.11/python3.11-venv/libpython3.11 missing and not root; Triton tests will be skipped" >&2
  fi
fi
if [ -x /usr/bin/python3.11 ]; then
  tstamp="$TRITON_VENV/.installed-$(sha256sum < scripts/triton-server-requirements.txt | cut -c1-16)"
  if [ ! -f "$tstamp" ]; then
    echo "setup: creating $TRITON_VENV (Triton Inference Server from nvidia-pytriton, onnxruntime)"
    [ -x "$TRITON_VENV/bin/python" ] || /usr/bin/python3.11 -m venv "$TRITON_VENV"
    "$TRITON_VENV/bin/pip" install -q --upgrade pip
    "$TRITON_VENV/bin/pip" install -q -r scripts/triton-server-requirements.txt
    rm -f "$TRITON_VENV"/.installed-*
    touch "$tstamp"
  fi
fi

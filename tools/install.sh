#!/usr/bin/env bash
# Installs everything the toolkit needs on a fresh Debian machine: espeak-ng + sox (mini corpora),
# libsndfile, and a Python venv (.venv) with the pinned requirements and this package in editable mode.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "${root}"

need=()
for bin in espeak-ng sox; do command -v "${bin}" >/dev/null 2>&1 || need+=("${bin}"); done
ldconfig -p 2>/dev/null | grep -q libsndfile || need+=(libsndfile1)
if [ ${#need[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    ${sudo} apt-get update -qq
    ${sudo} env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng sox libsndfile1 >/dev/null
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "${python}" -m venv .venv
if ! .venv/bin/python -c "import lobes, speechbrain, transformers, torchaudio" >/dev/null 2>&1 \
   || ! cmp -s requirements.txt .venv/.requirements.installed; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -r requirements.txt
    .venv/bin/pip install -q --no-deps -e .
    cp requirements.txt .venv/.requirements.installed
fi
.venv/bin/python -c "import torch, torchaudio, speechbrain; print('torch', torch.__version__, '| torchaudio', torchaudio.__version__, '| speechbrain', speechbrain.__version__)"

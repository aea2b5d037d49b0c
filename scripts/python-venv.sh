#!/usr/bin/env bash
# Creates .tools/venv with the real clients tests drive the simulators with:
# RunPod's official Python SDK (runpod) and boto3. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-"$root/.tools/venv"}
if [[ -x $venv/bin/python && -f $venv/.ep-ready ]]; then exit 0; fi
command -v python3 >/dev/null || { echo "python-venv: python3 is missing (make deps installs it)" >&2; exit 1; }
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check 'runpod==1.12.0' 'boto3>=1.35'
touch "$venv/.ep-ready"
echo "python-venv: runpod SDK and boto3 installed in $venv" >&2

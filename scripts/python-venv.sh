#!/usr/bin/env bash
# Creates .tools/venv with the real clients tests drive the simulators with (RunPod's official
# Python SDK and boto3), kubernetes-validate for the rendered manifests and prometheus-client, whose
# OpenMetrics parser reads the operator's /metrics. Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${1:-"$root/.tools/venv"}
marker=$venv/.ep-ready-3
if [[ -x $venv/bin/python && -f $marker ]]; then exit 0; fi
command -v python3 >/dev/null || { echo "python-venv: python3 is missing (make deps installs it)" >&2; exit 1; }
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check 'runpod==1.12.0' 'boto3>=1.35' 'kubernetes-validate==1.37.0' 'prometheus-client==0.21.1'
touch "$marker"
echo "python-venv: runpod SDK, boto3, kubernetes-validate and prometheus-client installed in $venv" >&2

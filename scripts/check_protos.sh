#!/usr/bin/env bash
# Fails when the committed generated code under p2pnode/proto/ differs from what the
# .proto files under protos/ generate.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$root/scripts/gen_protos.sh" "$tmp"
status=0
for f in "$tmp"/p2pnode/proto/*; do
  name=$(basename "$f")
  if ! cmp -s "$f" "$root/p2pnode/proto/$name"; then
    echo "proto drift: p2pnode/proto/$name differs from what protos/ generates; run scripts/gen_protos.sh" >&2
    status=1
  fi
done
for f in "$root"/p2pnode/proto/*_pb2*; do
  [ -e "$tmp/p2pnode/proto/$(basename "$f")" ] || { echo "proto drift: stale generated file $f" >&2; status=1; }
done
[ $status -eq 0 ] && echo "protos: generated code matches protos/"
exit $status

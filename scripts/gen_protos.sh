#!/usr/bin/env bash
# Regenerates p2pnode/proto/ from protos/p2pnode/proto/*.proto (python, gRPC and .pyi stubs).
# Usage: scripts/gen_protos.sh [OUTDIR]   (OUTDIR defaults to the repository root)
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
mkdir -p "$out/p2pnode/proto"
cd "$root/protos"
python -m grpc_tools.protoc -I . \
  --python_out="$out" --pyi_out="$out" --grpc_python_out="$out" \
  p2pnode/proto/*.proto

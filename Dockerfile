# The imu-edge image: `imu-node` (ENTRYPOINT) and `imu-fleet` on a slim Python, as a non-root user.
#
#   docker build -t imu-edge:0.1.0 .                     # Docker, with or without BuildKit
#   podman build --format docker -t imu-edge:0.1.0 .     # podman/buildah: keep the HEALTHCHECK
#   docker buildx build --platform linux/arm64,linux/amd64 -t imu-edge:0.1.0 .
#   docker run --rm imu-edge:0.1.0 --help
#
# Plain Dockerfile syntax, no `# syntax=` line and no `RUN --mount`: every builder takes it
# without fetching a frontend from Docker Hub. `--format docker` matters to podman/buildah: their
# default (OCI) image format has no HEALTHCHECK, so they would drop it, with a warning.
#
# What the image holds: the node's dependencies (pyproject.toml [project] dependencies, what
# `imu-node run` imports) and nothing else: no onnx (bundle building, the `fleet` extra), no pip,
# no test suites. The same image runs the fleet dashboard (`imu-fleet dashboard`); bundle
# building stays on the fleet's workstation (`pip install 'imu-edge[fleet]'`).
#
# Hailo-8: HailoRT's Python binding (`hailo_platform`) is not on PyPI. Put Hailo's wheel for this
# Python (cp311) and the Pi (linux_aarch64), of the same version as the host's driver, into the
# `hailo/` folder next to this file and it is installed with the project; without it the image
# serves on ONNX Runtime. /dev/hailo0 comes from the host (compose/edge.yml). docs/hardware.md,
# section "Container", has both ways and what to check.
#
# Python 3.11: Raspberry Pi OS Bookworm's Python, the one Hailo builds its aarch64 wheels for.
# Keep it >= requires-python in pyproject.toml (tests/test_deploy_files.py checks).
ARG PYTHON_VERSION=3.11
ARG DEBIAN_RELEASE=bookworm

# --- builder: a venv with the project and its pyproject dependencies ---------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_NO_COMPILE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_PREFER_BINARY=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv --upgrade-deps /opt/imu-edge/venv

WORKDIR /src
# Only what `pip install .` needs: pyproject.toml (the dependency list), the README it names as
# readme, and the packages of [tool.setuptools.packages.find]; hailo/ holds Hailo's optional
# wheels (and a README, so the folder is always there to copy).
COPY pyproject.toml README.md ./
COPY common/ common/
COPY schemas/ schemas/
COPY runtime/ runtime/
COPY node/ node/
COPY fleet/ fleet/
COPY demo/ demo/
COPY hailo/ hailo/

# One resolver run for the project and, when given, Hailo's wheel, so pip picks versions that suit
# both (HailoRT's wheels pin numpy < 2). Dependencies come from pyproject.toml only: no extras, no
# second list.
RUN set -eu; \
    abi="$(python -c 'import sys; print("cp%d%d" % sys.version_info[:2])')"; \
    plat="$(python -c 'import sysconfig; print(sysconfig.get_platform().replace("-", "_"))')"; \
    wheels=""; \
    for wheel in hailo/*.whl; do \
        [ -e "$wheel" ] || continue; \
        case "${wheel##*/}" in \
            *-"$abi"-"$abi"-"$plat".whl) wheels="$wheels $wheel" ;; \
            *) echo "hailo/: skipping ${wheel##*/} (this image needs $abi and $plat)" ;; \
        esac; \
    done; \
    /opt/imu-edge/venv/bin/pip install /src $wheels

# Leave out what the node never loads (docs/hardware.md, "What the Pi image contains"):
# - pip and setuptools: nothing is installed at run time;
# - ONNX Runtime's offline tools (model conversion, quantization, transformer optimisers), the
#   two libraries only they import (protobuf, flatbuffers), and its C-API library
#   (libonnxruntime.so: the Python binding is a separate, self-contained module);
# - numpy's test suites and test-helper modules, its build tools (f2py, distutils) and its
#   PyInstaller hook; pydantic.v1, the old API nothing here imports;
# - what only compilers and type checkers read: C headers, static libraries, Cython
#   declarations, *.pyi stubs.
# pip compiled nothing (PIP_NO_COMPILE): bytecode is written for what the node and the dashboard
# import, by importing it (and calling np.percentile, which imports numpy.ma on first use), so
# a read-only container neither compiles them at start nor holds the compiler's garbage: with
# numpy.ma and the HTTP modules compiled at run time, RSS after serving was 9 MB higher, and
# compiling everything costs 4 MB of image. tests/image checks that a serving node compiles
# nothing. The imports also prove the rest
# works (scripts/test-image then drives real windows through the image).
RUN set -eu; \
    venv=/opt/imu-edge/venv; \
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"; \
    "$venv/bin/python" -m pip uninstall --yes --quiet protobuf flatbuffers pip setuptools; \
    rm -rf "$site"/onnxruntime/capi/libonnxruntime.so.* "$site"/onnxruntime/tools \
        "$site"/onnxruntime/transformers "$site"/onnxruntime/quantization \
        "$site"/numpy/f2py "$site"/numpy/distutils "$site"/numpy/_pyinstaller \
        "$site"/numpy/_core/include "$site"/numpy/_core/lib "$site"/numpy/random/lib \
        "$site"/numpy/random/_examples "$site"/numpy/conftest.py "$site"/pydantic/v1 \
        "$site"/numpy/_core/_simd.* "$site"/numpy/_core/_*_tests.*; \
    find "$site/numpy" -depth -type d -name tests -exec rm -rf {} +; \
    find "$site" \( -name '*.pyi' -o -name '*.pxd' -o -name '*.h' -o -name '*.a' \) -delete; \
    find "$site" -depth -type d -name __pycache__ -exec rm -rf {} +; \
    env -u PYTHONDONTWRITEBYTECODE "$venv/bin/python" -P -c 'import numpy; numpy.percentile([0.0], 95); \
import node.app, node.cli, node.api.server, node.tools.check, node.tools.doctor, demo.cli, \
    fleet.cli, fleet.dashboard.server, onnxruntime, cryptography.x509'; \
    "$venv/bin/imu-node" --help > /dev/null; \
    "$venv/bin/imu-fleet" --help > /dev/null

# --- runtime: the venv, nothing else -------------------------------------------------------------
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS runtime

ARG IMU_UID=10001
ARG IMU_GID=10001

# A fixed uid/gid, so files on volumes and secrets given to the container keep one owner.
# /var/lib/imu-node holds the result spool, the desired-state history and the bundle cache.
RUN groupadd --system --gid "${IMU_GID}" imu \
    && useradd --system --uid "${IMU_UID}" --gid imu --home-dir /var/lib/imu-node \
        --no-create-home --shell /usr/sbin/nologin imu \
    && install -d -o imu -g imu -m 0750 /var/lib/imu-node /var/lib/imu-node/cache \
    && install -d -o root -g imu -m 0750 /etc/imu-node

COPY --from=builder /opt/imu-edge/venv /opt/imu-edge/venv

# XDG_* as in compose/imu-node.service: spool and state under $XDG_STATE_HOME/imu-edge,
# bundles under $XDG_CACHE_HOME/imu-edge/bundles, all on the volume below.
ENV PATH=/opt/imu-edge/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/var/lib/imu-node \
    XDG_STATE_HOME=/var/lib/imu-node \
    XDG_CACHE_HOME=/var/lib/imu-node/cache

USER ${IMU_UID}:${IMU_GID}
WORKDIR /var/lib/imu-node
VOLUME ["/var/lib/imu-node"]

# http_listen (IMU_NODE_HTTP_LISTEN): /healthz, /livez, /readyz, /status, /metrics, POST /infer
# and the rest of the sidecar's API (docs/sidecar.md). The node binds
# 127.0.0.1 unless told otherwise; 0.0.0.0:9108 needs http_token_file (docs/security.md).
EXPOSE 9108

# Liveness from inside the container: /livez on the port of IMU_NODE_HTTP_LISTEN (9108 when
# unset, e.g. with http_listen in node.toml), over loopback. Not /healthz: that one answers 503
# while the node waits for its first model, which is no reason to restart it. Plain HTTP only:
# with http_tls_cert, override the check. A node without http_listen reports unhealthy, on purpose.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('IMU_NODE_HTTP_LISTEN', '9108').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/livez', timeout=4)"]

# SIGTERM drains the queue, waits for the broker's acks, publishes `stopped` and exits 0: give it
# time (docker stop -t 30, compose stop_grace_period).
STOPSIGNAL SIGTERM
ENTRYPOINT ["imu-node"]
CMD ["run", "--config", "/etc/imu-node/node.toml"]

# Shared set-up for the scripts that drive podman (scripts/image-base, scripts/test-image).
# shellcheck shell=bash
#
# Podman's defaults ask for more than some machines give a container: crun refuses a cgroup v1
# layout and root's default rlimits (nofile, nproc) can exceed the hard limits of a sandbox
# without CAP_SYS_RESOURCE, so runc fails with "error setting rlimit ... operation not
# permitted". Unless the caller chose a configuration (CONTAINERS_CONF), use one that fits this
# machine: runc, netavark, and rlimits no higher than this shell's hard limits.

IMAGE_CACHE="${IMU_IMAGE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/imu-edge/images}"
mkdir -p "$IMAGE_CACHE"

if [ -z "${CONTAINERS_CONF:-}" ]; then
  nofile="$(ulimit -Hn)"
  [ "$nofile" = unlimited ] && nofile=65536
  # nproc: 16384 is what the sandboxes we run in accept for a container (32768 and more were
  # refused even under a higher hard limit); pids_limit in compose/ is far below it.
  nproc="$(ulimit -Hu)"
  if [ "$nproc" = unlimited ] || [ "$nproc" -gt 16384 ]; then nproc=16384; fi
  runtime=""
  command -v runc >/dev/null && runtime='runtime = "runc"'
  # Debian's podman ships a CNI configuration too; netavark (with aardvark-dns) resolves the
  # compose service names, so say which to use rather than let podman guess.
  backend=""
  [ -x /usr/lib/podman/netavark ] && backend='network_backend = "netavark"'
  export CONTAINERS_CONF="$IMAGE_CACHE/containers.conf"
  cat > "$CONTAINERS_CONF" <<EOF
# written by scripts/_podman.sh for this machine
[containers]
default_ulimits = ["nofile=$nofile:$nofile", "nproc=$nproc:$nproc"]
[engine]
$runtime
[network]
$backend
EOF
fi

# The image the Dockerfile builds FROM, and the broker image compose/ runs.
PYTHON_BASE="docker.io/library/python:3.11-slim-bookworm"
BROKER_IMAGE="docker.io/library/eclipse-mosquitto:2"


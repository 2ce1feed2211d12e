#!/usr/bin/env bash
# `make image-check`: build the images of docker/ with podman and run the pipeline inside them.
#
# For each image (the CPU image; the GPU image with a CPU torch wheel, so that every layer but
# the CUDA download is built and exercised), a second build on top of it runs, as a RUN step
# and as the image's own non-root user: `mid --help`, `mid validate configs/digits.yaml` and a
# tiny `mid pool` (Ray, the pool actors, a store written and verified). A RUN step, not
# `podman run`, because rootless sandboxes without cgroup rights (this project's build
# machines) build images but cannot start containers; on a machine that can, the result is
# the same. Prints each step's time and each image's size; exits non-zero on the first failure.
#
# Settings (environment):
#   BASE           the images' base (default python:3.11-slim). When it can be neither found
#                  nor pulled, a Debian bookworm base with Python 3.11 is made with debootstrap
#                  from this machine's apt mirror and `podman import`ed as localhost/mid-base.
#   HOST_CA        a CA bundle the RUN steps trust instead of the base's (default: pip's cert
#                  setting here, for a TLS-inspecting proxy).
#   TORCH_WHEELS   a folder holding a CPU torch wheel; the images take torch from it instead of
#                  download.pytorch.org (default: /opt/wheels when it holds one).
#   PODMAN         the podman command (default: podman).
set -euo pipefail
cd "$(dirname "$0")/.."

PODMAN=${PODMAN:-podman}
BASE=${BASE:-python:3.11-slim}
BUILD=("$PODMAN" build --isolation chroot)
LOCAL_BASE=localhost/mid-base:bookworm
started=$(date +%s)

say() { echo "[image-check] $*"; }
elapsed() { echo "$(( $(date +%s) - $1 )) s"; }

apt_mirror() {  # the first Debian URI of this machine's apt sources
    local uri
    uri=$(grep -hoE '^(URIs:|deb) +https?://[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
          | grep -v security | head -1 | awk '{print $2}')
    echo "${uri:-http://deb.debian.org/debian}"
}

make_debian_base() {
    local rootfs t0
    t0=$(date +%s)
    rootfs=$(mktemp -d)
    trap 'rm -rf "$rootfs"' RETURN
    say "base: $BASE cannot be pulled here; debootstrap bookworm from $(apt_mirror)"
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,python-is-python3,ca-certificates \
        bookworm "$rootfs" "$(apt_mirror)" > /tmp/mid-image-check-debootstrap.log 2>&1 \
        || { tail -20 /tmp/mid-image-check-debootstrap.log; exit 1; }
    # Debian marks its Python externally managed (PEP 668); the image is a whole environment
    # for one application, as python:3.11-slim is, so pip may install into it.
    tar -C "$rootfs" -c . | "$PODMAN" import --change "ENV PIP_BREAK_SYSTEM_PACKAGES=1" \
        --change 'CMD ["/bin/bash"]' - "$LOCAL_BASE" > /dev/null
    say "base: $LOCAL_BASE made in $(elapsed "$t0")"
}

if ! "$PODMAN" image exists "$BASE" && ! "$PODMAN" pull -q "$BASE" > /dev/null 2>&1; then
    "$PODMAN" image exists "$LOCAL_BASE" || make_debian_base
    BASE=$LOCAL_BASE
fi

TORCH_WHEELS=${TORCH_WHEELS:-$(ls /opt/wheels/torch-*.whl > /dev/null 2>&1 && echo /opt/wheels || true)}
build_args=()
if [ -n "$TORCH_WHEELS" ]; then
    # torch from the folder (its +cpu build outranks the index's same version), its dependencies from the index.
    build_args=(--volume "$TORCH_WHEELS:/wheels:ro" --build-arg "TORCH_SOURCE=--find-links /wheels")
    say "torch: from the wheels in $TORCH_WHEELS"
fi

# A machine behind a TLS-inspecting proxy trusts its CA through pip's `cert` setting; the
# builds' RUN steps see the same bundle in place of the base's (Debian's pip reads that file).
HOST_CA=${HOST_CA:-${PIP_CERT:-$(pip config get global.cert 2>/dev/null || true)}}
if [ -n "$HOST_CA" ] && [ -f "$HOST_CA" ]; then
    build_args+=(--volume "$HOST_CA:/etc/ssl/certs/ca-certificates.crt:ro")
    say "TLS: RUN steps trust $HOST_CA (pip's cert setting here)"
fi

# The tiny pool: the bundled digits, one epoch each for the models it attacks, two attacks.
TINY_POOL="mid pool /opt/mid/configs/digits.yaml --store /tmp/check/store --out /tmp/check/out \
 --set data.train_limit=128 --set data.test_limit=32 --set models.baseline.epochs=1 \
 --set models.teacher.epochs=1 --set 'pool.attacks=[PGD_N, FGSM_T]' --set attacks.PGD.nb_iter=2 \
 --set pool.variants=1 --set pool.shard_size=64 --set ray.num_cpus=2"

check_image() {  # $1: tag of the image to run the three commands in
    local context t0
    t0=$(date +%s)
    context=$(mktemp -d)
    cat > "$context/Containerfile" <<EOF
FROM $1
RUN test "\$(id -u)" != 0 && echo "running as \$(id -un)" \
 && mid --help > /dev/null && echo "mid --help: ok" \
 && mid validate /opt/mid/configs/digits.yaml \
 && $TINY_POOL \
 && mid cache verify --store /tmp/check/store
EOF
    local log=/tmp/mid-image-check-run.log status=0
    "${BUILD[@]}" --no-cache -t "$1-check" "$context" > "$log" 2>&1 || status=$?
    rm -rf "$context"
    "$PODMAN" rmi -f "$1-check" > /dev/null 2>&1 || true
    grep -vE '^(STEP|COMMIT|-->|Getting|Copying|Writing|Storing)' "$log" | tail -40
    [ "$status" = 0 ] || { say "$1: the commands inside failed (the whole output: $log)"; exit 1; }
    say "$1: mid --help, mid validate and a tiny mid pool ran inside it in $(elapsed "$t0")"
}

build_image() {  # $1: flavour (cpu, gpu); $2: tag
    local t0
    t0=$(date +%s)
    say "building $2 from docker/Dockerfile.$1 on $BASE"
    "${BUILD[@]}" -f "docker/Dockerfile.$1" --build-arg "BASE=$BASE" "${build_args[@]}" -t "$2" . \
        > "/tmp/mid-image-check-$1.log" 2>&1 || { tail -30 "/tmp/mid-image-check-$1.log"; exit 1; }
    say "$2: built in $(elapsed "$t0"), $("$PODMAN" image inspect --format '{{.Size}}' "$2" \
        | awk '{printf "%.2f GB", $1 / 1e9}')"
}

build_image cpu mid-pipeline:cpu
check_image mid-pipeline:cpu
if [ -n "$TORCH_WHEELS" ]; then
    # Every layer of the GPU image but its CUDA torch: the user, the pins, the entry point.
    build_image gpu mid-pipeline:gpu-with-cpu-torch
    check_image mid-pipeline:gpu-with-cpu-torch
else
    build_image gpu mid-pipeline:gpu
fi
say "done in $(elapsed "$started")"

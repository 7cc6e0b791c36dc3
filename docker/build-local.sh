#!/usr/bin/env bash
# Build docker/Dockerfile without a Docker engine or a registry, then check the image.
#
#   docker/build-local.sh [--rebuild-base] [--no-smoke] [--tag NAME] [--variant cpu|cuda|auto]
#
# Public base images cannot be pulled here, so the base is made locally: debootstrap makes a
# Debian bookworm root with python3 (3.11), venv and pip, `podman import` turns it into
# localhost/vit-rerank-base, and `podman build --isolation=chroot` builds the Dockerfile on it.
# torch comes from PyTorch's CPU index when that is reachable; otherwise the default PyPI build
# (CUDA) is downloaded once into a wheelhouse on the host, which the build mounts, so a second run
# does not download it again. The built image is then checked without running a container:
# `podman image mount` and chroot run `vit-rerank --help` and `vit-rerank serve --help` inside it
# as the image's non-root user, and `podman image inspect` shows the user, healthcheck, port,
# volume and entrypoint. A smoke test then runs the service from the image the same way (the demo
# gallery, random weights) and checks its HEALTHCHECK command, the web page, /index, a search and
# an explanation picture.
#
# Needs root (debootstrap, chroot, podman's storage) and Debian's podman and debootstrap packages;
# they are installed with apt-get when missing.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
BASE_TAG=localhost/vit-rerank-base
TAG=localhost/vit-rerank:local
VARIANT=auto
REBUILD_BASE=0
SMOKE=1
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${VIT_RERANK_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vit-rerank-docker}
TORCH_SPEC=("torch>=2.4,!=2.13.0+cpu" "torchvision>=0.19")

while [ $# -gt 0 ]; do
    case "$1" in
        --rebuild-base) REBUILD_BASE=1 ;;
        --no-smoke) SMOKE=0 ;;
        --tag) TAG="$2"; shift ;;
        --variant) VARIANT="$2"; shift ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
    shift
done

step() { printf '\n== %s (%ds)\n' "$*" "$SECONDS"; }

if [ "$(id -u)" != 0 ]; then
    echo "error: run as root (debootstrap, chroot and podman image mount need it)" >&2
    exit 1
fi
missing=()
command -v podman >/dev/null || missing+=(podman)
command -v debootstrap >/dev/null || missing+=(debootstrap)
# runc beside podman's crun: where crun cannot set rlimits or cgroups (our sandbox), tests/test_container.py
# starts containers with --runtime runc
command -v runc >/dev/null || missing+=(runc)
if [ ${#missing[@]} -gt 0 ]; then
    step "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
mkdir -p "$CACHE"

# ---- 1. the local base image ----------------------------------------------------------------
if [ "$REBUILD_BASE" = 1 ] || ! podman image exists "$BASE_TAG"; then
    step "debootstrap $SUITE with python3, python3-venv and pip"
    rootfs="$CACHE/rootfs"
    rm -rf "$rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        "$SUITE" "$rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
        || { tail -20 "$CACHE/debootstrap.log" >&2; exit 1; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    step "importing the root file system as $BASE_TAG"
    podman rmi -f "$BASE_TAG" >/dev/null 2>&1 || true
    tar -C "$rootfs" -c . | podman import - "$BASE_TAG" >/dev/null
    rm -rf "$rootfs"
else
    step "reusing $BASE_TAG (--rebuild-base makes it again)"
fi
echo "base image size: $(( $(podman image inspect --format '{{.Size}}' "$BASE_TAG") / 1000000 )) MB"

# ---- 2. where torch comes from --------------------------------------------------------------
build_args=(--build-arg "BASE_IMAGE=$BASE_TAG")
volumes=()
# This host's CA bundle goes into the build too, so pip there trusts what pip here trusts (e.g. a
# TLS-inspecting proxy's certificate, which Debian's bundle in the image lacks).
CA_BUNDLE=${CA_BUNDLE:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}}}
if [ -f "$CA_BUNDLE" ]; then
    volumes+=(-v "$CA_BUNDLE:/run/host-ca.crt:ro")
    build_args+=(--build-arg CA_BUNDLE=/run/host-ca.crt)
else
    CA_BUNDLE=
fi
if [ "$VARIANT" = auto ]; then
    if python3 -c 'import urllib.request; urllib.request.urlopen("https://download.pytorch.org/whl/cpu/torch/", timeout=10)' 2>/dev/null; then
        VARIANT=cpu
    else
        VARIANT=cuda
        echo "PyTorch's CPU index is unreachable: using the default PyPI torch (CUDA build)"
    fi
fi
build_args+=(--build-arg "TORCH_VARIANT=$VARIANT")
if [ "$VARIANT" = cuda ]; then
    step "wheelhouse for ${TORCH_SPEC[*]} in $CACHE/wheels (files already there are kept)"
    # --isolated: PyPI only, whatever this host's pip configuration adds. The wheels are chosen
    # for this host's platform (no --platform: pip would backtrack through every torch release
    # when one of the CUDA libraries' manylinux tags is missing from an explicit list), which is
    # the image's too: x86_64 glibc Linux, Python 3.11.
    if ! python3 -m pip download --isolated --disable-pip-version-check --progress-bar off \
            ${CA_BUNDLE:+--cert "$CA_BUNDLE"} --only-binary=:all: --python-version 3.11 \
            -d "$CACHE/wheels" "${TORCH_SPEC[@]}" > "$CACHE/pip-download.log" 2>&1; then
        tail -20 "$CACHE/pip-download.log" >&2
        exit 1
    fi
    grep -E '^Saved' "$CACHE/pip-download.log" || echo "(every wheel was already there)"
    du -sh "$CACHE/wheels"
    volumes+=(-v "$CACHE/wheels:/wheels:ro")
    build_args+=(--build-arg WHEELHOUSE=/wheels)
fi

# ---- 3. the image ---------------------------------------------------------------------------
step "podman build --isolation=chroot (TORCH_VARIANT=$VARIANT) -> $TAG"
build_start=$SECONDS
# --format docker keeps HEALTHCHECK (the OCI image format has no field for it).
podman build --isolation=chroot --format docker -f "$REPO/docker/Dockerfile" -t "$TAG" \
    "${build_args[@]}" "${volumes[@]}" "$REPO"
echo "build took $((SECONDS - build_start)) s"

# ---- 4. checks ------------------------------------------------------------------------------
step "checks"
podman images --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E "vit-rerank" || true
podman image inspect --format \
    'user={{.Config.User}} entrypoint={{.Config.Entrypoint}} cmd={{.Config.Cmd}} ports={{.Config.ExposedPorts}} volumes={{.Config.Volumes}}' \
    "$TAG"
healthcheck=$(podman image inspect --format '{{json .Config.Healthcheck}}' "$TAG")
echo "healthcheck=$healthcheck"
case "$healthcheck" in *healthz*) ;; *) echo "FAIL: no /healthz healthcheck in the image" >&2; exit 1 ;; esac
user=$(podman image inspect --format '{{.Config.User}}' "$TAG")
[ -n "$user" ] && [ "$user" != root ] && [ "$user" != 0 ] || { echo "FAIL: the image runs as root" >&2; exit 1; }

mnt=$(podman image mount "$TAG")
# The mounted image is read-only: its /tmp and the user's home get writable tmpfs (torch writes to the
# temporary folder as soon as it is imported), as a container's own writable layer would give them.
extra_mounts=()
cleanup() {
    set +e
    if [ -n "${server_pid:-}" ]; then kill "$server_pid" 2>/dev/null || true; wait "$server_pid" 2>/dev/null || true; fi
    for ((i=${#extra_mounts[@]}-1; i>=0; i--)); do umount -R "${extra_mounts[$i]}" 2>/dev/null || umount -l "${extra_mounts[$i]}"; done
    podman image unmount "$TAG" >/dev/null 2>&1 || true
}
trap cleanup EXIT
for d in tmp home/vitrerank; do mount -t tmpfs -o mode=1777 tmpfs "$mnt/$d"; extra_mounts+=("$mnt/$d"); done
in_image() {  # run a command inside the mounted image as its user, with the image's PATH
    chroot --userspec="$user:$user" "$mnt" /usr/bin/env -i HOME=/home/vitrerank \
        PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HF_HUB_OFFLINE=1 "$@"
}
in_image_exec() {  # the same, replacing the calling (sub)shell: `in_image_exec ... &` gives its PID
    exec chroot --userspec="$user:$user" "$mnt" /usr/bin/env -i HOME=/home/vitrerank \
        PATH=/opt/venv/bin:/usr/local/bin:/usr/bin:/bin HF_HUB_OFFLINE=1 "$@"
}
echo "--- passwd entry: $(grep "^$user:" "$mnt/etc/passwd")"
echo "--- owner of /data/index and /weights: $(in_image stat -c '%U' /data/index /weights | tr '\n' ' ')"
echo "--- python -c 'import torch, service'"
in_image python -c 'import sys, torch, service, vit_rerank; print(sys.version.split()[0], "torch", torch.__version__)'
echo "--- vit-rerank --help"
in_image vit-rerank --help
echo "--- vit-rerank serve --help"
in_image vit-rerank serve --help

# ---- 5. smoke test: the service inside the image ----------------------------------------------
# The image's own files run with chroot, which needs no container runtime: the demo gallery with random
# weights, on writable tmpfs folders. tests/test_container.py (make test-container) runs the image as a
# real container (podman run, compose's volumes, the real backbone).
if [ "$SMOKE" = 1 ]; then
    step "smoke test: vit-rerank serve --demo --weights random inside the image"
    # rslave: unmounting the copy afterwards must not propagate to this host's /dev.
    mount --rbind /dev "$mnt/dev"; mount --make-rslave "$mnt/dev"; extra_mounts+=("$mnt/dev")
    mount -t proc proc "$mnt/proc"; extra_mounts+=("$mnt/proc")
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    in_image_exec vit-rerank serve --demo --weights random --device cpu --host 127.0.0.1 --port "$port" \
        --no-progress --log-level warning > "$CACHE/smoke-server.log" 2>&1 &
    server_pid=$!
    # The HEALTHCHECK's own command, pointed at this port: ["CMD", argv...] -> argv.
    mapfile -d '' -t hc < <(printf '%s' "$healthcheck" | python3 -c 'import json, sys
print("\0".join(a.replace(":8000/", ":" + sys.argv[1] + "/") for a in json.load(sys.stdin)["Test"][1:]), end="")' "$port")
    ready=0
    for _ in $(seq 1 240); do
        kill -0 "$server_pid" 2>/dev/null || { echo "FAIL: the server exited" >&2; cat "$CACHE/smoke-server.log" >&2; exit 1; }
        if python3 - "$port" <<'PY'
import sys, urllib.request, urllib.error
try:
    sys.exit(0 if urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/readyz", timeout=2).status == 200 else 1)
except (urllib.error.URLError, OSError):
    sys.exit(1)
PY
        then ready=1; break; fi
        sleep 1
    done
    [ "$ready" = 1 ] || { echo "FAIL: not ready after 240 s" >&2; cat "$CACHE/smoke-server.log" >&2; exit 1; }
    echo "ready after ${SECONDS}s of the script"
    echo "--- the image's HEALTHCHECK command (port $port): ${hc[*]:0:2} ..."
    in_image "${hc[@]}" && echo "healthcheck: healthy"
    echo "--- GET /, GET /index, POST /search with a demo photo"
    photo=$(find "$mnt/opt/venv/lib/python3.11/site-packages/service/demo_gallery" -name '*.jpg' | sort | sed -n 1p)
    python3 - "$port" "$photo" <<'PY'
import json, sys, urllib.request, uuid
base = f"http://127.0.0.1:{sys.argv[1]}"
page = urllib.request.urlopen(base + "/").read().decode()
assert "vit-rerank" in page and "/static/app.js" in page, "GET / is not the web page"
assert urllib.request.urlopen(base + "/static/app.js").status == 200
info = json.load(urllib.request.urlopen(base + "/index"))
print("index:", {k: info[k] for k in ("images", "model", "weights", "random_weights")})
boundary = uuid.uuid4().hex
body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n"
        f"Content-Type: image/jpeg\r\n\r\n").encode() + open(sys.argv[2], "rb").read() + f"\r\n--{boundary}--\r\n".encode()
req = urllib.request.Request(base + "/search", data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
answer = json.load(urllib.request.urlopen(req, timeout=120))
assert answer["random_weights"] is True and answer["results"], answer
print("search:", len(answer["results"]), "results; timings_ms", {k: round(v, 1) for k, v in answer["timings_ms"].items()})
top = answer["results"][0]
png = urllib.request.urlopen(base + top["explanation_url"], timeout=120)
assert png.headers["Content-Type"] == "image/png"
print("explanation picture:", len(png.read()), "bytes")
PY
fi
step "OK: $TAG built and checked"

#!/usr/bin/env bash
# Build the pvmig container image with no registry but the package registries:
#   1. the base image, once: debootstrap a minimal Debian into a folder, docker import it
#      (skipped while the image exists; --rebuild-base forces it);
#   2. the wheels: pvmig's own, built from this work tree, and its dependencies, as
#      wheels for the base image's Python, platform and libc (asked of the image itself);
#   3. docker build of deploy/Dockerfile on that base, installing the wheels offline.
#
#   deploy/build-image.sh [--image pvmig:dev] [--base-image pvmig-base:bookworm]
#                         [--suite bookworm] [--work DIR] [--rebuild-base]
#
# Env: PYTHON, a Python with pip to build and download wheels (default python3);
# DEBIAN_MIRROR (default http://deb.debian.org/debian). Needs root (debootstrap), a
# running Docker engine, debootstrap. Nothing is pulled: there is no image registry.
set -Eeuo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(dirname "$HERE")

die() { echo "$PROG: $*" >&2; exit 1; }
say() { echo "$PROG: $*" >&2; }

image=pvmig:dev
base_image=pvmig-base:bookworm
suite=bookworm
work=${TMPDIR:-/var/tmp}/pvmig-image
rebuild_base=""
while (($#)); do
    case $1 in
        --image) image=${2:?--image needs a name}; shift 2 ;;
        --base-image) base_image=${2:?--base-image needs a name}; shift 2 ;;
        --suite) suite=${2:?--suite needs a Debian suite}; shift 2 ;;
        --work) work=${2:?--work needs a directory}; shift 2 ;;
        --rebuild-base) rebuild_base=1; shift ;;
        -h|--help) sed -n '9,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2 ;;
        *) die "unknown option '$1'" ;;
    esac
done
python=${PYTHON:-python3}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
# The legacy builder uses a local base image as it is; BuildKit may try to resolve it in
# a registry, and a newer docker client may lack the buildx plugin.
export DOCKER_BUILDKIT=0

command -v docker >/dev/null || die "'docker' not found: install docker.io"
docker info >/dev/null 2>&1 || die "no Docker engine answers (docker info fails): start dockerd"
"$python" -m pip --version >/dev/null 2>&1 \
    || die "'$python -m pip' fails: set PYTHON to a Python with pip"
mkdir -p "$work"
# One build at a time per work folder: two would share the rootfs and the wheels.
exec 9>"$work/.lock"
flock -w 900 9 || die "another build holds $work/.lock"

# ---- 1. base image

if [[ -n $rebuild_base ]] || ! docker image inspect "$base_image" >/dev/null 2>&1; then
    [[ $(id -u) == 0 ]] || die "not root: debootstrap needs root to make the base image"
    command -v debootstrap >/dev/null || die "'debootstrap' not found: install debootstrap"
    rootfs=$work/rootfs
    rm -rf "$rootfs"
    say "making $base_image: debootstrap $suite (about a minute)"
    debootstrap --variant=minbase --include=python3,python3-venv,iproute2 \
        "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
        || { tail -n 20 "$work/debootstrap.log" >&2
             die "debootstrap failed (log: $work/debootstrap.log)"; }
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
    tar -C "$rootfs" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' - "$base_image" >/dev/null
    rm -rf "$rootfs"
    say "made $base_image"
else
    say "$base_image exists: kept (--rebuild-base to make it again)"
fi

# ---- 2. wheels

# Tags for the image's interpreter, asked of it (never assumed from this host's).
read -r pyver libc arch < <(docker run --rm --network none "$base_image" python3 -c '
import platform, sys
print(f"{sys.version_info[0]}.{sys.version_info[1]}", platform.libc_ver()[1], platform.machine())')
[[ $libc =~ ^2\.([0-9]+)$ ]] || die "cannot tell the base image's glibc version (got '$libc')"
platforms=(--platform "manylinux2014_$arch")
for ((minor = 17; minor <= BASH_REMATCH[1]; minor++)); do
    platforms+=(--platform "manylinux_2_${minor}_$arch")
done

context=$work/context
rm -rf "$context"
mkdir -p "$context/wheels"
# Build from a copy of the work tree: an in-tree build would leave build/ behind, and a
# stale build/ would put deleted modules in the wheel.
rm -rf "$work/src"
mkdir -p "$work/src"
tar -C "$REPO" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
    --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis --exclude=./tests \
    -c . | tar -C "$work/src" -x
say "building the pvmig wheel"
# A fixed zip timestamp: the same tree gives the same wheel, and docker build its cache.
SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel --quiet --no-deps \
    --wheel-dir "$context/wheels" "$work/src" || die "building the pvmig wheel failed"
wheel=$(ls "$context"/wheels/pvmig-*.whl)
say "downloading dependencies for Python $pyver, glibc $libc, $arch"
"$python" -m pip download --quiet --dest "$context/wheels" --only-binary=:all: \
    --python-version "$pyver" --implementation cp "${platforms[@]}" "$wheel" \
    || die "downloading pvmig's dependencies as wheels for Python $pyver/$arch failed"

# ---- 3. image

say "building $image on $base_image"
old=$(docker image inspect --format '{{.Id}}' "$image" 2>/dev/null || true)
docker build --build-arg "BASE=$base_image" -t "$image" -f "$HERE/Dockerfile" \
    "$context" >"$work/build.log" 2>&1 \
    || { tail -n 30 "$work/build.log" >&2; die "docker build failed (log: $work/build.log)"; }
rm -rf "$work/src"
# Each build of a changed tree would otherwise leave the last image behind, untagged.
new=$(docker image inspect --format '{{.Id}}' "$image")
if [[ -n $old && $old != "$new" ]]; then
    docker rmi "$old" >/dev/null 2>&1 || true  # still used by a container: kept
fi
say "built $image"
echo "$image"

#!/bin/bash
# Build the node images the OpenStack configuration names (openstack_image, openstack_gpu_image) with
# diskimage-builder (`pip install diskimage-builder`; run as root, it uses chroot and loop devices).
#
#   images/build.sh [-o DIR] [-f FORMAT] [-d DISTRO] [-r RELEASE] [-e ELEMENT]... IMAGE...
#
# IMAGE is one of
#   cloudml-os-node       training and serving nodes: base, model server, every framework runtime (CPU)
#   cloudml-os-node-gpu   the same with the NVIDIA driver and CUDA (cloudml-os-gpu) and CUDA TensorFlow
#   cloudml-os-base       the base alone (no runtimes): a quick build to try the toolchain
# -o DIR      where DIR/IMAGE.FORMAT goes (default ./images-out)
# -f FORMAT   qcow2 (default), raw, or tar (a root filesystem tarball, no bootloader: needs no loop device)
# -d DISTRO   debian (default) or ubuntu; -r RELEASE: bookworm (default) / noble...
# -e ELEMENT  an extra element (repeatable), e.g. a site's own CA certificates or mirror settings
# The elements' own settings (DIB_CLOUDML_OS_*: login user, runtime root, CUDA repository) are read
# from the environment; see images/elements/*/README.rst.
set -eu
set -o pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
out=./images-out
format=qcow2
distro=debian
release=
extra=()

usage() {
    sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "$1"
}

while getopts "o:f:d:r:e:h" option; do
    case "$option" in
        o) out=$OPTARG ;;
        f) format=$OPTARG ;;
        d) distro=$OPTARG ;;
        r) release=$OPTARG ;;
        e) extra+=("$OPTARG") ;;
        h) usage 0 ;;
        *) usage 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ "$#" -eq 0 ]; then
    usage 2
fi
case "$format" in
    qcow2|raw|tar) ;;
    *) echo "build.sh: unknown format $format (qcow2, raw or tar)" >&2; exit 2 ;;
esac
case "$distro" in
    debian) release=${release:-bookworm} ;;
    ubuntu) release=${release:-noble} ;;
    *) echo "build.sh: unknown distro $distro (debian or ubuntu)" >&2; exit 2 ;;
esac
if ! command -v disk-image-create > /dev/null; then
    echo "build.sh: disk-image-create not found: pip install diskimage-builder" >&2
    exit 1
fi

export ELEMENTS_PATH="$here/elements${ELEMENTS_PATH:+:$ELEMENTS_PATH}"
export DIB_CLOUDML_OS_SOURCE=${DIB_CLOUDML_OS_SOURCE:-$(dirname "$here")}
export DIB_RELEASE=$release
if [ "$distro" = debian ]; then
    # deb.debian.org serves the security suite too (security.debian.org is not reachable everywhere).
    export DIB_DEBIAN_SECURITY_MIRROR=${DIB_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
fi
mkdir -p "$out"

common=("$distro-minimal" cloudml-os-base)
if [ "$format" != tar ]; then
    common+=(vm)
fi
node=(cloudml-os-serving cloudml-os-tensorflow cloudml-os-mxnet cloudml-os-pytorch)

for image in "$@"; do
    case "$image" in
        cloudml-os-node) elements=("${common[@]}" "${node[@]}") ;;
        cloudml-os-node-gpu) elements=("${common[@]}" cloudml-os-gpu "${node[@]}") ;;
        cloudml-os-base) elements=("${common[@]}") ;;
        *) echo "build.sh: unknown image $image" >&2; usage 2 ;;
    esac
    echo "build.sh: $image ($format, $distro $release): ${elements[*]} ${extra[*]}"
    disk-image-create -a amd64 -t "$format" -o "$out/$image" "${elements[@]}" "${extra[@]}"
done

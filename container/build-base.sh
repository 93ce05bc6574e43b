#!/usr/bin/env bash
# Build the container base image locally, for machines that reach Debian's package mirror but no image
# registry. BentoML's generated Dockerfile starts FROM python:3.11-slim; this makes an image of that name
# from a minimal Debian bookworm (whose Python is 3.11) so `podman build` never needs to pull.
#   container/build-base.sh      as root (debootstrap needs it, and `make container` then runs as root too,
#                                 on root's podman images); needs: apt-get install -y podman runc debootstrap
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
  echo "build-base.sh: run it as root: debootstrap needs root, and the image goes to root's podman storage" >&2
  exit 1
fi
for tool in debootstrap podman; do
  command -v "$tool" >/dev/null || { echo "build-base.sh: no $tool: apt-get install -y podman runc debootstrap" >&2; exit 1; }
done
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
root=$(mktemp -d)/rootfs
trap 'rm -rf "$(dirname "$root")"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,libgomp1 \
  bookworm "$root" "$mirror"
# The image is a build base, not a system Python to protect: let pip install into it (BentoML installs uv).
rm -f "$root"/usr/lib/python3*/EXTERNALLY-MANAGED
ln -sf python3 "$root/usr/bin/python"
# Trust the certificate authorities this machine added locally (an egress proxy that re-signs TLS, say),
# so apt, pip and uv inside the image reach the package registries the host reaches.
if compgen -G "/usr/local/share/ca-certificates/*.crt" > /dev/null; then
  cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
  chroot "$root" update-ca-certificates
fi
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
# uv (which BentoML's Dockerfile installs with) reads its trust roots from SSL_CERT_FILE, not the system store.
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' - docker.io/library/python:3.11-slim
echo "built docker.io/library/python:3.11-slim from Debian bookworm"

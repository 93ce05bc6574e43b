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
# Slim as Debian's own images are (debuerreotype's slim variant): no manuals, documentation beyond the
# copyright files, or translations, now or from any later package; and apt keeps neither the packages it
# downloads nor its binary caches, and its lists compressed and in English only, so a layer that runs
# `apt-get install` (the worker image, say) carries only what it installs.
cat > "$root/etc/dpkg/dpkg.cfg.d/docker-slim" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
CFG
find "$root/usr/share/doc" -mindepth 1 ! -name copyright ! -type d -delete
find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
rm -rf "$root"/usr/share/man/* "$root"/usr/share/info/* "$root"/usr/share/groff/* "$root"/usr/share/lintian/*
find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
cat > "$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
CFG
printf 'Acquire::GzipIndexes "true";\nAcquire::CompressionTypes::Order:: "gz";\n' \
  > "$root/etc/apt/apt.conf.d/docker-gzip-indexes"
printf 'Acquire::Languages "none";\n' > "$root/etc/apt/apt.conf.d/docker-no-languages"
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/cache/apt/*.bin "$root"/var/lib/apt/lists/* \
  "$root"/var/log/apt/* "$root"/var/log/dpkg.log "$root"/var/cache/debconf/*-old
# uv (which BentoML's Dockerfile installs with) reads its trust roots from SSL_CERT_FILE, not the system store.
tar -C "$root" -c . | podman import --change 'CMD ["python3"]' \
  --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' - docker.io/library/python:3.11-slim
echo "built docker.io/library/python:3.11-slim from Debian bookworm"

#!/usr/bin/env bash
# Fetches one Debian kernel image package (and, with -p, other packages) into build/kernels
# and unpacks it, without touching the system's apt state: a private apt configuration
# under build/kernels/apt/<suite>-<arch> holds the suite's package lists. The archive is
# the one this machine's apt sources already name (its "debian" entry), so nothing here
# names a mirror.
#   vm/fetch-kernel.sh SUITE ARCH PACKAGE...   e.g. bookworm amd64 linux-image-amd64
# Each PACKAGE is unpacked into build/kernels/<suite>-<arch>/root; metapackages
# (linux-image-amd64) are followed to the versioned image they depend on. Prints the
# unpacked root's path.
set -euo pipefail
suite=$1 arch=$2; shift 2
out=${KERNELS_DIR:-build/kernels}/$suite-$arch
apt=$out/apt
mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial" "$out/debs" "$out/root"
apt=$(cd "$apt" && pwd)

site=$(apt-get indextargets --format '$(SITE)' 2>/dev/null | grep -m1 '/debian$' || true)
[ -n "$site" ] || { echo "fetch-kernel: no Debian archive in this machine's apt sources" >&2; exit 1; }
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$keyring arch=$arch] $site $suite main" > "$apt/sources.list"
APT=(apt-get -q -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Dir::State::status=/dev/null
     -o APT::Architecture="$arch" -o APT::Architectures::="$arch")
CACHE=(apt-cache -o Dir::Etc::SourceList="$apt/sources.list" -o Dir::Etc::SourceParts=/dev/null
     -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Dir::State::status=/dev/null
     -o APT::Architecture="$arch" -o APT::Architectures::="$arch")
# The lists once a day at most.
if [ -z "$(find "$apt/lists" -name '*Packages*' -mtime -1 2>/dev/null | head -1)" ]; then
  "${APT[@]}" update >&2
fi
for pkg in "$@"; do
  real=$pkg
  # A metapackage: follow its first linux-image-* dependency to the versioned package.
  dep=$("${CACHE[@]}" depends "$pkg" 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*\).*/\1/p' | head -1)
  [ -n "$dep" ] && real=$dep
  (cd "$out/debs" && ls "${real}"_*.deb >/dev/null 2>&1 || "${APT[@]}" download "$real" >&2)
  for deb in "$out/debs/${real}"_*.deb; do dpkg-deb -x "$deb" "$out/root"; done
done
echo "$out/root"

#!/bin/sh
# Builds memsnap's Debian binary packages with dpkg-deb from an install tree (make deb):
#   libmemsnapMAJOR   the shared library (file and SONAME link), named after its SONAME
#                     as Debian names library packages, so two ABIs can be installed
#   libmemsnap-dev    headers (include/memsnap/), the development link libmemsnap.so,
#                     memsnap.pc and the CMake package configuration
# Usage: deb.sh STAGE OUTDIR VERSION MAJOR ARCH, where STAGE holds `make install
# DESTDIR=STAGE PREFIX=/usr`. Prints the paths of the packages built.
set -eu
stage=$1 out=$2 version=$3 major=$4 arch=$5
maintainer=${DEB_MAINTAINER:-"memsnap maintainers <memsnap@localhost>"}
runtime=libmemsnap$major dev=libmemsnap-dev
soname=libmemsnap.so.$major realname=libmemsnap.so.$version
work=$out/deb-trees
rm -rf "$work"
mkdir -p "$work/$runtime/usr/lib" "$work/$dev/usr/lib"

# The split: the runtime package takes the library file and its SONAME link; the rest of
# the install tree is development files.
mv "$stage/usr/lib/$realname" "$stage/usr/lib/$soname" "$work/$runtime/usr/lib/"
cp -a "$stage/usr/." "$work/$dev/usr/"

# The runtime's dependencies, read from the library: the newest glibc symbol version it
# uses, and libgcc_s (unwinding), which it names as NEEDED.
lib=$work/$runtime/usr/lib/$realname
glibc=$(objdump -T "$lib" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -uV | tail -1)
depends="libc6 (>= $glibc)"
if readelf -d "$lib" | grep -q 'NEEDED.*\[libgcc_s\.so\.1\]'; then
  depends="$depends, libgcc-s1"
fi

# control, md5sums, and for the runtime the shlibs entry (so packages built against it
# depend on it through dpkg-shlibdeps) and the ldconfig trigger (the SONAME link cache).
control() { # package section depends description long-description
  pkg=$1
  mkdir -p "$work/$pkg/DEBIAN"
  size=$(du -sk --exclude=DEBIAN "$work/$pkg" | cut -f1)
  cat > "$work/$pkg/DEBIAN/control" <<CONTROL
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: $maintainer
Installed-Size: $size
Depends: $3
Section: $2
Priority: optional
Description: $4
 $5
CONTROL
  (cd "$work/$pkg" && find usr -type f -exec md5sum {} + | sort -k2 > DEBIAN/md5sums)
}
control "$runtime" libs "$depends" \
  "copy-on-write snapshots of a process's own memory, with rewind" \
  "memsnap: a drop-in for Firefox record/replay's MemorySnapshot (shared library)."
echo "libmemsnap $major $runtime (>= $version)" > "$work/$runtime/DEBIAN/shlibs"
echo "activate-noawait ldconfig" > "$work/$runtime/DEBIAN/triggers"
control "$dev" libdevel "$runtime (= $version)" \
  "copy-on-write memory snapshots with rewind - development files" \
  "memsnap's headers (include/memsnap/), pkg-config file and CMake package configuration."

for pkg in "$runtime" "$dev"; do
  deb=$out/${pkg}_${version}_$arch.deb
  dpkg-deb --root-owner-group --build "$work/$pkg" "$deb" >/dev/null
  echo "$deb"
done

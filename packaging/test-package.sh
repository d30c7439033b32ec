#!/bin/sh
# make test-package, after make deb: installs the packages with dpkg into a scratch root
# (its own dpkg database; the machine is left alone), checks the installed library's
# SONAME and links, then builds and runs an outside consumer (consumer/) with nothing but
# `pkg-config --cflags --libs memsnap`, and once more through CMake's find_package.
# Usage: test-package.sh BUILD CXX DEB...
set -eu
build=$1 cxx=$2
shift 2
root=$(pwd)/$build/pkgroot
rm -rf "$root"
mkdir -p "$root/var/lib/dpkg/info" "$root/var/lib/dpkg/updates"
: > "$root/var/lib/dpkg/status"
# --force-depends: the scratch root lists no libc6 or libgcc-s1 package (the machine's
# are used), so dpkg warns about those two dependencies instead of refusing.
dpkg --root="$root" --force-depends --force-not-root -i "$@"
for pkg in $(for deb in "$@"; do dpkg-deb -f "$deb" Package; done); do
  dpkg --root="$root" -s "$pkg" | grep -q '^Status: install ok installed' || {
    echo "test-package: $pkg is not installed in $root"; exit 1; }
done

lib=$root/usr/lib
soname=$(readelf -d "$lib/libmemsnap.so" | sed -n 's/.*(SONAME).*\[\(.*\)\]/\1/p')
[ -n "$soname" ] && [ -L "$lib/$soname" ] && [ -L "$lib/libmemsnap.so" ] || {
  echo "test-package: expected libmemsnap.so -> SONAME link ($soname) -> file in $lib"; ls -l "$lib"; exit 1; }
echo "test-package: installed $(readlink "$lib/$soname") (SONAME $soname) in $root"

# The consumer, with pkg-config alone: the sysroot variable prefixes its -I and -L.
export PKG_CONFIG_SYSROOT_DIR="$root" PKG_CONFIG_LIBDIR="$lib/pkgconfig"
flags=$(pkg-config --cflags --libs memsnap)
echo "test-package: pkg-config --cflags --libs memsnap: $flags"
# shellcheck disable=SC2086 # the flags are words
"$cxx" packaging/consumer/consumer.cpp $flags -o "$build/memsnap-consumer"
readelf -d "$build/memsnap-consumer" | grep -q "NEEDED.*\[$soname\]" || {
  echo "test-package: the consumer does not name $soname"; exit 1; }
LD_LIBRARY_PATH="$lib" "./$build/memsnap-consumer"

# And through CMake (cmake is installed by the Makefile when missing).
rm -rf "$build/cmake-consumer"
cmake -S packaging/consumer -B "$build/cmake-consumer" -DCMAKE_CXX_COMPILER="$cxx" \
  -DCMAKE_PREFIX_PATH="$root/usr" >/dev/null
cmake --build "$build/cmake-consumer" >/dev/null
LD_LIBRARY_PATH="$lib" "./$build/cmake-consumer/memsnap-consumer"
echo "test-package: consumer built and run with pkg-config and with find_package(memsnap)"

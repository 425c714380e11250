#!/bin/sh
# Installs the C client library: the header, the shared and static libraries, and a
# pkg-config file made from vmnet-broker.pc.in.
# Usage: capi/install.sh [--prefix DIR] [--from DIR]
#   --prefix  where to install (default /usr/local)
#   --from    a cargo target profile directory holding libvmnetbroker.{so,a}; without it
#             the libraries are built in release mode first
set -eu
prefix=/usr/local
from=""
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=$2; shift 2 ;;
    --from) from=$2; shift 2 ;;
    *) echo "usage: $0 [--prefix DIR] [--from DIR]" >&2; exit 2 ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
if [ -z "$from" ]; then
  cargo build --release --quiet -p vmnet-broker-capi --lib --manifest-path "$here/../Cargo.toml"
  from="$here/../target/release"
fi
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$here/Cargo.toml" | head -n 1)
install -d "$prefix/include" "$prefix/lib/pkgconfig"
install -m 0644 "$here/include/vmnet-broker.h" "$prefix/include/"
install -m 0755 "$from/libvmnetbroker.so" "$prefix/lib/"
install -m 0644 "$from/libvmnetbroker.a" "$prefix/lib/"
sed -e "s|@PREFIX@|$prefix|" -e "s|@VERSION@|$version|" "$here/vmnet-broker.pc.in" \
  > "$prefix/lib/pkgconfig/vmnet-broker.pc"
echo "installed vmnet-broker $version into $prefix"

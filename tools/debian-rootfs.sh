#!/usr/bin/env bash
# Build (once) and print the path of a Debian 12 minbase root filesystem tarball.
#
#   tools/debian-rootfs.sh            -> prints e.g. ~/.cache/layerfs/debian-bookworm-minbase.tar
#   tools/debian-rootfs.sh large      -> minbase plus python3, perl and git (~350 MB)
#
# Benchmarks and tests share it. It is made with debootstrap from the Debian
# mirror configured for apt on this machine, cached under $LAYERFS_CACHE
# (default ~/.cache/layerfs), and rebuilt only when missing. Needs root.
set -euo pipefail
cache=${LAYERFS_CACHE:-$HOME/.cache/layerfs}
suite=${DEBIAN_SUITE:-bookworm}
variant=${1:-minbase}
case "$variant" in
    minbase) include="" ;;
    large) include="--include=python3,perl,git,less,procps" ;;
    *) echo "usage: $0 [minbase|large]" >&2; exit 2 ;;
esac
out="$cache/debian-$suite-$variant.tar"
mkdir -p "$cache"
exec 9>"$cache/.debian-rootfs.lock"
flock 9
if [ -s "$out" ]; then
    echo "$out"
    exit 0
fi
mirror=${DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
    # The first Debian archive URL apt itself uses (enabled files only).
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | sed -n -E 's,^(deb|URIs:)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?://[^[:space:]]*/debian)/?([[:space:]]|$).*,\3,p' \
        | awk 'NR==1' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}
work=$(mktemp -d "$cache/build.XXXXXX")
trap 'rm -rf "$work"' EXIT
debootstrap --variant=minbase $include "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || {
    tail -n 20 "$work/log" >&2
    exit 1
}
rm -rf "$work/root/var/cache/apt/archives/"*.deb "$work/root/var/lib/apt/lists/"*
tar --numeric-owner --xattrs -C "$work/root" -cf "$work/rootfs.tar" .
mv "$work/rootfs.tar" "$out"
echo "$out"

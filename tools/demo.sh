#!/usr/bin/env bash
# The layerfs demo (`make demo`, which installs what is missing first).
#
# Builds a tiny real image root filesystem from this machine's busybox-static
# (/bin/busybox, a symlink per applet, /etc/passwd and /etc/group) as a tar,
# imports it into a fresh store under a temporary directory and shows it with
# `layerfs images`, `history` and `inspect`; then mounts it, runs a program in
# it (`layerfs run`, as root), changes it through a writable mount, commits the
# change as a new image, shows its history and mounts the result. Everything it
# makes is removed on exit, mounts included.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
layerfs_bin="$repo/.venv/bin/layerfs"
busybox=/bin/busybox
applets=(sh ls cat echo env true false sleep id ps mount)

die() { echo "demo: error: $*" >&2; exit 1; }

[[ -x "$layerfs_bin" ]] || die "$layerfs_bin is missing; run 'make deps' first"
[[ -x "$busybox" ]] || die "$busybox is missing; apt-get install busybox-static"

work=$(mktemp -d "${TMPDIR:-/tmp}/layerfs-demo.XXXXXX")
store="$work/store"

cleanup() {
    # Unmount anything still mounted below $work (deepest first) before removing it.
    local point
    while read -r point; do
        fusermount3 -u -z "$point" 2>/dev/null || umount -l "$point" 2>/dev/null || true
    done < <(awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo | sort -r)
    rm -rf "$work"
}
trap cleanup EXIT

# Shows each layerfs command as a user would type it, then runs it on the demo store.
layerfs() {
    local arg shown="layerfs"
    for arg in "$@"; do
        if [[ "$arg" =~ ^[A-Za-z0-9_./:@=+-]+$ ]]; then shown+=" $arg"; else shown+=" '$arg'"; fi
    done
    printf '\n$ %s\n' "$shown"
    "$layerfs_bin" --root "$store" "$@"
}

echo "demo: building a busybox root filesystem in $work"
rootfs="$work/rootfs"
mkdir -p "$rootfs"/{bin,etc,root,tmp}
chmod 700 "$rootfs/root"
chmod 1777 "$rootfs/tmp"
cp "$busybox" "$rootfs/bin/busybox"
for applet in "${applets[@]}"; do
    ln -s busybox "$rootfs/bin/$applet"
done
cat >"$rootfs/etc/passwd" <<'EOF'
root:x:0:0:root:/root:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
EOF
cat >"$rootfs/etc/group" <<'EOF'
root:x:0:
nogroup:x:65534:
EOF
tar -C "$rootfs" --numeric-owner --owner=0 --group=0 --sort=name --mtime=@1700000000 \
    -cf "$work/busybox.tar" .
echo "demo: $(du -h "$work/busybox.tar" | cut -f1) root filesystem tar: $work/busybox.tar"

layerfs import -m "busybox-static demo image" -c 'CMD ["/bin/sh"]' \
    "$work/busybox.tar" demo/busybox:latest
layerfs images
layerfs history demo/busybox
layerfs inspect demo/busybox

# Shows a shell command as a user would type it, then runs it.
show() {
    printf '\n$ %s\n' "$*"
    bash -c "$*"
}

mnt="$work/mnt"
mkdir "$mnt"
layerfs mount demo/busybox "$mnt"
layerfs mounts
show "ls -la '$mnt' '$mnt/bin' | head -n 20"
show "chroot '$mnt' /bin/sh -c 'echo hello from \$(cat /etc/passwd | head -n 1)'"
layerfs umount "$mnt"

if [[ $(id -u) -eq 0 ]]; then
    layerfs run --rm demo/busybox sh -c 'echo "pid $$ on host $(cat /etc/hostname)"; ls /'
else
    echo "demo: (layerfs run needs root; skipped)"
fi

layerfs mount --rw demo/busybox "$mnt"
show "echo 'made in a writable mount' > '$mnt/root/hello.txt' && rm '$mnt/bin/false' && chmod 700 '$mnt/tmp'"
layerfs commit -m "add /root/hello.txt, drop /bin/false" "$mnt" demo/busybox:hello
layerfs umount "$mnt"
layerfs history demo/busybox:hello

layerfs mount demo/busybox:hello "$mnt"
show "cat '$mnt/root/hello.txt'; ls '$mnt/bin'; stat -c '%A %n' '$mnt/tmp'"
layerfs umount "$mnt"
echo
echo "demo: done (everything under $work is removed now)"

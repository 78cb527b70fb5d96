#!/usr/bin/env bash
# Builds a small bootable Debian 12 box for vagrant-libvirt from Debian's
# packages only (no Vagrant Cloud): the box `make vm-test` uses.
#
#   tools/build-vagrant-box.sh [--output FILE] [--size GIB] [--mirror URL]
#                              [--bare] [--force]
#
# What it does, as root on a Debian/Ubuntu host:
#   1. a sparse raw disk with one MBR partition (1 MiB .. end), attached to a
#      loop device, formatted ext4 (label "root") and mounted;
#   2. mmdebstrap installs bookworm into it: systemd, the cloud kernel
#      (virtio, fuse, overlay, netfilter), grub-pc, openssh-server, sudo,
#      ifupdown + isc-dhcp-client, rsync (for Vagrant's rsync synced folder);
#   3. the packages of the build and test groups of tools/debian-packages.txt,
#      read through `tools/install-deps.sh --list` (the one list; with or without
#      recommends as the list says), so that the VM's provisioning, which runs
#      install-deps.sh all the same, finds them installed instead of unpacking
#      them under emulation; --bare leaves them out;
#      the Vagrant conventions: user vagrant (password vagrant) with sudo
#      NOPASSWD and the insecure public key that Debian's vagrant package
#      ships; root's password is vagrant too; DHCP on eth0 (net.ifnames=0), so
#      the libvirt default network (or vagrant-libvirt's own) hands out the
#      address; ssh host keys and /etc/machine-id are made on first boot;
#   4. grub-install to the loop device and update-grub in a chroot
#      (serial console on ttyS0 as well as tty0);
#   5. unmounts, detaches the loop device, converts the disk to compressed
#      qcow2 and packs box.img + metadata.json (provider libvirt) + Vagrantfile
#      into a .box (a plain tar).
# Whatever happens, mounts and the loop device are removed on exit.
#
# Default output: ~/.cache/layerfs-vagrant/debian12-local.box, outside git.
# Add it with: vagrant box add --name layerfs/debian12-local FILE
# Needs: mmdebstrap, qemu-utils, fdisk, e2fsprogs, mount, and the vagrant
# package (for the insecure key); `tools/install-deps.sh --vm` installs them.
set -euo pipefail

output="${XDG_CACHE_HOME:-$HOME/.cache}/layerfs-vagrant/debian12-local.box"
size_gib=20
mirror=http://deb.debian.org/debian
security_mirror=http://deb.debian.org/debian-security
force=0
bare=0
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "build-vagrant-box: error: $*" >&2; exit 1; }
say() { echo "build-vagrant-box: $*"; }

while (($#)); do
    case "$1" in
        --output) output=${2:?--output needs a file}; shift 2 ;;
        --size) size_gib=${2:?--size needs a number of GiB}; shift 2 ;;
        --mirror) mirror=${2:?--mirror needs a URL}; shift 2 ;;
        --force) force=1; shift ;;
        --bare) bare=1; shift ;;
        -h | --help) usage; exit 0 ;;
        *) die "unknown option '$1' (see --help)" ;;
    esac
done

[[ $(id -u) -eq 0 ]] || die "needs root (loop devices, mounts, chroot)"
for tool in mmdebstrap qemu-img sfdisk losetup partx mkfs.ext4 tar; do
    command -v "$tool" >/dev/null || die "$tool is missing; run: tools/install-deps.sh --vm"
done
if [[ -e "$output" && $force -eq 0 ]]; then
    say "$output exists (use --force to rebuild)"
    exit 0
fi

# The insecure key as Debian's vagrant package ships it.
pubkey=""
for candidate in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
    /usr/share/vagrant/keys/vagrant.pub /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    if [[ -f "$candidate" ]]; then pubkey=$candidate; break; fi
done
[[ -n "$pubkey" ]] || die "cannot find vagrant's insecure public key (apt-get install vagrant)"

mkdir -p "$(dirname "$output")"
work=$(mktemp -d "$(dirname "$output")/build.XXXXXX")
disk="$work/disk.raw"
mnt="$work/root"
loop=""

cleanup() {
    local rc=$?
    set +e
    if [[ -d "$mnt" ]] && mountpoint -q "$mnt"; then
        umount -R "$mnt" 2>/dev/null || umount -R -l "$mnt"
    fi
    if [[ -n "$loop" ]]; then
        partx -d "$loop" 2>/dev/null
        losetup -d "$loop"
    fi
    rm -rf "$work"
    if ((rc != 0)); then echo "build-vagrant-box: failed (exit $rc); nothing was left behind" >&2; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start=$SECONDS

# --- 1. disk, partition, file system ------------------------------------------
say "disk: ${size_gib} GiB sparse, one partition"
truncate -s "${size_gib}G" "$disk"
printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$disk"
loop=$(losetup --find --show --partscan "$disk")
part="${loop}p1"
# Without udev the partition node can lag behind (or never come): ask for it.
for _ in $(seq 50); do
    [[ -b "$part" ]] && break
    partx -u "$loop" 2>/dev/null || partx -a "$loop" 2>/dev/null || true
    sleep 0.1
done
[[ -b "$part" ]] || die "partition device $part did not appear"
mkfs.ext4 -q -L root "$part"
mkdir -p "$mnt"
mount "$part" "$mnt"
rmdir "$mnt/lost+found" # mmdebstrap wants an empty directory; recreated below

# --- 2 + 3. Debian and the Vagrant conventions -----------------------------------
packages=(
    systemd-sysv udev dbus kmod procps iproute2 netbase ifupdown isc-dhcp-client
    linux-image-cloud-amd64 grub-pc initramfs-tools
    openssh-server sudo rsync less
)
say "mmdebstrap bookworm (${#packages[@]} packages and their dependencies)"
# The customize hook runs on the host with the new root as $1.
cp "$pubkey" "$work/vagrant.pub"
cat >"$work/customize.sh" <<'EOF'
#!/bin/sh
set -eu
root=$1
keyfile=$2

echo layerfs-box >"$root/etc/hostname"
cat >"$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	layerfs-box
::1	localhost ip6-localhost ip6-loopback
HOSTS
echo 'LABEL=root / ext4 errors=remount-ro 0 1' >"$root/etc/fstab"

cat >"$root/etc/network/interfaces" <<'NET'
auto lo
iface lo inet loopback

auto eth0
iface eth0 inet dhcp
NET

chroot "$root" useradd --create-home --shell /bin/bash --groups sudo vagrant
echo 'vagrant:vagrant' | chroot "$root" chpasswd
echo 'root:vagrant' | chroot "$root" chpasswd
install -d -m 700 "$root/home/vagrant/.ssh"
install -m 600 "$keyfile" "$root/home/vagrant/.ssh/authorized_keys"
chroot "$root" chown -R vagrant:vagrant /home/vagrant/.ssh
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"

# Every VM gets its own host keys and machine id on first boot.
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/systemd/system/ssh.service.d"
cat >"$root/etc/systemd/system/ssh.service.d/host-keys.conf" <<'UNIT'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT
printf 'UseDNS no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"

cat >"$root/etc/default/grub" <<'GRUB'
GRUB_DEFAULT=0
GRUB_TIMEOUT=1
GRUB_DISTRIBUTOR=Debian
GRUB_CMDLINE_LINUX_DEFAULT=""
GRUB_CMDLINE_LINUX="net.ifnames=0 biosdevname=0 console=tty0 console=ttyS0,115200n8"
GRUB_TERMINAL="console serial"
GRUB_SERIAL_COMMAND="serial --speed=115200"
GRUB_DISABLE_OS_PROBER=true
GRUB
EOF
chmod +x "$work/customize.sh"

# The test packages, from the one list. Their daemons (dockerd) must not start in
# the chroot: policy-rc.d says no for the duration.
test_hooks=()
if ((!bare)); then
    with_rec=() without_rec=()
    while read -r group pkg recommends; do
        [[ "$group" == vm ]] && continue
        if [[ "$recommends" == no ]]; then without_rec+=("$pkg"); else with_rec+=("$pkg"); fi
    done < <(bash "$repo/tools/install-deps.sh" --list)
    say "and the ${#with_rec[@]}+${#without_rec[@]} build and test packages of tools/debian-packages.txt"
    test_hooks=(
        --customize-hook='printf "#!/bin/sh\nexit 101\n" >"$1/usr/sbin/policy-rc.d"; chmod 755 "$1/usr/sbin/policy-rc.d"'
        --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o APT::Install-Recommends=true ${with_rec[*]}"
        --customize-hook="chroot \"\$1\" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends ${without_rec[*]}"
        --customize-hook='rm -f "$1/usr/sbin/policy-rc.d"'
    )
fi

mmdebstrap --mode=root --variant=minbase --components=main \
    --include="$(IFS=,; echo "${packages[*]}")" \
    --aptopt='Acquire::Retries "3"' \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook="$work/customize.sh \"\$1\" $work/vagrant.pub" \
    "${test_hooks[@]}" \
    --customize-hook='chroot "$1" apt-get clean' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/*' \
    bookworm "$mnt" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb $security_mirror bookworm-security main"
(cd "$mnt" && mklost+found >/dev/null 2>&1)

# --- 4. boot loader ---------------------------------------------------------------
say "grub-install $loop"
# rslave: unmounting these copies must never propagate back to the host's /dev.
for fs in dev proc sys; do
    mount --rbind "/$fs" "$mnt/$fs"
    mount --make-rslave "$mnt/$fs"
done
chroot "$mnt" grub-install --target=i386-pc --no-floppy "$loop"
chroot "$mnt" update-grub 2>&1 | sed 's/^/  /'
# Without udev there is no /dev/disk/by-uuid, so grub-mkconfig names the root by
# the loop partition's path; the VM knows it by label. (In the VM, update-grub
# after a kernel upgrade has udev and writes root=UUID=.)
sed -i "s|root=$part |root=LABEL=root |" "$mnt/boot/grub/grub.cfg"
if grep -q "$loop" "$mnt/boot/grub/grub.cfg"; then die "grub.cfg still names $loop"; fi
grep -q 'root=LABEL=root' "$mnt/boot/grub/grub.cfg" || die "grub.cfg has no root=LABEL=root"
umount -R "$mnt"

# --- 5. qcow2 and the box --------------------------------------------------------
partx -d "$loop" 2>/dev/null || true
losetup -d "$loop"
loop=""
say "qemu-img convert to compressed qcow2"
qemu-img convert -c -O qcow2 "$disk" "$work/box.img"
rm -f "$disk"
cat >"$work/metadata.json" <<EOF
{"provider": "libvirt", "format": "qcow2", "virtual_size": $size_gib}
EOF
cat >"$work/Vagrantfile" <<'EOF'
# Defaults of the layerfs Debian 12 box (built by tools/build-vagrant-box.sh).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.disk_bus = "virtio"
    libvirt.nic_model_type = "virtio"
  end
end
EOF
tar -C "$work" -cf "$work/box.tar" metadata.json Vagrantfile box.img
mv "$work/box.tar" "$output"
say "wrote $output ($(du -h "$output" | cut -f1)) in $((SECONDS - start)) s"
say "add it with: vagrant box add --force --name layerfs/debian12-local $output"

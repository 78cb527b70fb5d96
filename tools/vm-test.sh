#!/usr/bin/env bash
# `make vm-test`: the whole suite in a real VM (vagrant-libvirt), then the VM is gone.
#
#   tools/vm-test.sh [--box KEY] [--rebuild-box] [--keep]
#
#   --box KEY      a LAYERFS_BOX of vagrant/Vagrantfile (default: $LAYERFS_BOX or
#                  local, the box
#                  tools/build-vagrant-box.sh builds offline; debian12 and
#                  ubuntu2404 need Vagrant Cloud)
#   --rebuild-box  build the local box again even if it exists
#   --keep         leave the VM running for `cd vagrant && vagrant ssh`
#                  (then `vagrant destroy -f` yourself)
#
# Steps, each timed: install what the host needs (tools/install-deps.sh --vm:
# vagrant, vagrant-libvirt, libvirt, qemu, mmdebstrap; as root via apt), start
# libvirtd and libvirt's default network if they are not running, build the box
# if it is missing and `vagrant box add` it, `vagrant up --provider=libvirt`
# (provisioner deps: tools/install-deps.sh inside), provisioner test-root (make
# check-host, then make test as root, CI=true), provisioner test-user (the FUSE tests as an
# unprivileged user in the fuse group), copy the JUnit reports to
# reports/vm-BOX-root.xml and reports/vm-BOX-user.xml and print their counts.
# KVM is used where /dev/kvm exists and the CPU shows vmx or svm, software
# emulation (TCG) otherwise.
#
# On exit, whatever happened, the VM is destroyed and whatever this script started
# (libvirtd, virtlogd, the default network) is stopped again.
# Environment: LAYERFS_VM_CPUS (1), LAYERFS_VM_MEMORY (2048 MiB), as in the Vagrantfile.
# Exit status: 0 when both runs passed, 1 when either failed, 2 when the VM
# could not be brought up.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
box_key=${LAYERFS_BOX:-local}
rebuild_box=0
keep=0
while (($#)); do
    case "$1" in
        --box) box_key=${2:?--box needs a key}; shift 2 ;;
        --rebuild-box) rebuild_box=1; shift ;;
        --keep) keep=1; shift ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "vm-test: error: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done

say() { echo "vm-test: $*"; }
die() { echo "vm-test: error: $*" >&2; exit 2; }

local_box_name=layerfs/debian12-local
local_box_file="${XDG_CACHE_HOME:-$HOME/.cache}/layerfs-vagrant/debian12-local.box"
reports="$repo/reports"
mkdir -p "$reports"
export VAGRANT_CWD="$repo/vagrant"
export VAGRANT_CHECKPOINT_DISABLE=1
export LAYERFS_BOX="$box_key"
export LAYERFS_VM_SERIAL_LOG="$reports/vm-$box_key-serial.log"
export LIBVIRT_DEFAULT_URI=qemu:///system
# The VM reaches the network through this host: let it trust what the host trusts
# (a TLS-intercepting proxy's CA, say). LAYERFS_VM_CA_CERTS= (empty) turns it off.
if [[ -z "${LAYERFS_VM_CA_CERTS+set}" ]]; then
    for bundle in "${PIP_CERT:-}" "${SSL_CERT_FILE:-}" /etc/ssl/certs/ca-certificates.crt; do
        if [[ -n "$bundle" && -s "$bundle" ]]; then export LAYERFS_VM_CA_CERTS="$bundle"; break; fi
    done
fi
first_provisioners=deps
if [[ -n "${LAYERFS_VM_CA_CERTS:-}" ]]; then first_provisioners=ca-certs,deps; fi
virsh() { command virsh -q "$@"; }
# Vagrant draws progress bars with ESC[K even without a terminal: drop them.
vagrant() {
    command vagrant "$@" 2>&1 | sed -u -E 's/(\x1b\[K)?Progress: [^\x1b]*//g; s/\x1b\[K//g'
}

# --- timings -------------------------------------------------------------------------
declare -a step_names=() step_seconds=() step_results=()
timed() { # timed NAME COMMAND...: runs it, records its time and status, returns its status
    local name=$1 start=$SECONDS rc=0
    shift
    say "--- $name"
    "$@" || rc=$?
    step_names+=("$name")
    step_seconds+=($((SECONDS - start)))
    step_results+=("$([[ $rc -eq 0 ]] && echo ok || echo "failed ($rc)")")
    say "--- $name: $((SECONDS - start)) s, $([[ $rc -eq 0 ]] && echo ok || echo "exit $rc")"
    return "$rc"
}
print_timings() {
    local i
    say "step timings:"
    for i in "${!step_names[@]}"; do
        printf '  %-34s %6s s  %s\n' "${step_names[$i]}" "${step_seconds[$i]}" "${step_results[$i]}"
    done
}

# --- cleanup ---------------------------------------------------------------------------
started_libvirtd=0
started_virtlogd=0
started_network=0
kvm_mode=""
vm_created=0
ssh_config=$(mktemp)
cleanup() {
    local rc=$?
    set +e
    rm -f "$ssh_config"
    if ((vm_created)); then
        if ((keep)); then
            say "--keep: the VM is still running; cd vagrant && vagrant destroy -f when done"
        else
            timed "vagrant destroy" vagrant destroy -f
            local left
            left=$(virsh list --all --name | grep '^layerfs-' || true)
            if [[ -n "$left" ]]; then
                say "warning: removing libvirt domains left behind: $left"
                for domain in $left; do
                    virsh destroy "$domain" >/dev/null 2>&1
                    virsh undefine "$domain" --remove-all-storage >/dev/null 2>&1
                done
            fi
        fi
    fi
    if ((!keep)); then
        if [[ -n "$kvm_mode" ]]; then chown "root:${kvm_mode#*:}" /dev/kvm; chmod "${kvm_mode%%:*}" /dev/kvm; fi
        if ((started_network)); then virsh net-destroy default >/dev/null; fi
        if ((started_libvirtd)); then stop_daemon libvirtd; fi
        if ((started_virtlogd)); then stop_daemon virtlogd; fi
    fi
    print_timings
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

stop_daemon() { # our own libvirtd/virtlogd, by the pid file it wrote
    local pidfile=/run/$1.pid pid
    pid=$(cat "$pidfile" 2>/dev/null) || return 0
    kill "$pid" 2>/dev/null || return 0
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
}

# --- 1. host packages ---------------------------------------------------------------
[[ $(id -u) -eq 0 ]] || die "run as root (libvirt's system instance, loop devices for the box)"
timed "install host packages" bash "$repo/tools/install-deps.sh" --vm || die "install-deps.sh --vm failed"
for tool in vagrant virsh qemu-img; do
    command -v "$tool" >/dev/null || die "$tool is missing after install-deps.sh --vm"
done
vagrant plugin list 2>/dev/null | grep -q vagrant-libvirt || die "the vagrant-libvirt plugin is missing"

# --- 2. libvirt ---------------------------------------------------------------------
start_libvirt() {
    if virsh version >/dev/null 2>&1; then return 0; fi
    if [[ -d /run/systemd/system ]]; then
        systemctl start libvirtd.service
    else
        # No systemd (a container or sandbox): run the daemons ourselves.
        if ! pgrep -x virtlogd >/dev/null; then
            /usr/sbin/virtlogd --daemon && started_virtlogd=1
        fi
        /usr/sbin/libvirtd --daemon && started_libvirtd=1
    fi
    for _ in $(seq 100); do
        virsh version >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "libvirtd did not answer on $LIBVIRT_DEFAULT_URI" >&2
    return 1
}
start_network() {
    if ! virsh net-info default >/dev/null 2>&1; then
        virsh net-define /usr/share/libvirt/networks/default.xml
    fi
    if virsh net-info default | grep -Eq '^Active:[[:space:]]+yes'; then return 0; fi
    virsh net-start default && started_network=1
}
timed "start libvirtd" start_libvirt || die "cannot start libvirtd"
timed "start the default network" start_network || die "cannot start libvirt's default network"
if [[ -n "${LAYERFS_LIBVIRT_DRIVER:-}" ]]; then
    say "libvirt driver $LAYERFS_LIBVIRT_DRIVER (from LAYERFS_LIBVIRT_DRIVER)"
elif [[ -c /dev/kvm ]] && ! grep -Eqw 'vmx|svm' /proc/cpuinfo; then
    # A /dev/kvm without vmx/svm (a nested hypervisor emulating it) runs guests
    # far slower than qemu's own TCG: the Vagrantfile picks TCG too.
    export LAYERFS_LIBVIRT_DRIVER=qemu
    say "/dev/kvm exists but the CPU shows no vmx/svm: software emulation (TCG)"
elif [[ -c /dev/kvm ]]; then
    # qemu runs as libvirt-qemu in group kvm; without udev (containers, sandboxes)
    # /dev/kvm can stay root-only: give it udev's usual root:kvm 0660 for the run.
    if getent group kvm >/dev/null && [[ "$(stat -c %G /dev/kvm)" != kvm ||
        $(( 0$(stat -c %a /dev/kvm) & 060 )) -ne 060 ]]; then
        kvm_mode="$(stat -c %a:%G /dev/kvm)"
        chgrp kvm /dev/kvm && chmod 660 /dev/kvm
        say "KVM: /dev/kvm was $kvm_mode, root:kvm 0660 while the VM runs"
    else
        say "KVM: /dev/kvm is there"
    fi
else
    export LAYERFS_LIBVIRT_DRIVER=qemu
    say "no usable /dev/kvm: software emulation (slow; boot timeout 30 min)"
fi

# --- 3. the box ---------------------------------------------------------------------
if [[ "$box_key" == local ]]; then
    if ((rebuild_box)) || [[ ! -f "$local_box_file" ]]; then
        timed "build the box" bash "$repo/tools/build-vagrant-box.sh" --force \
            --output "$local_box_file" || die "building the box failed"
    fi
    stamp="$(dirname "$local_box_file")/added-$(stat -c %Y "$local_box_file")"
    if [[ ! -f "$stamp" ]] || ! vagrant box list | grep -q "^$local_box_name "; then
        add_box() {
            vagrant box add --force --name "$local_box_name" "$local_box_file"
            # vagrant-libvirt keeps the base image in the storage pool under the box's
            # name; an older one there would be used instead of the new box.
            local volume
            for volume in $(virsh vol-list default 2>/dev/null | awk '{print $1}' |
                grep "^${local_box_name//\//-VAGRANTSLASH-}_vagrant_box_image_" || true); do
                virsh vol-delete --pool default "$volume" >/dev/null
            done
            rm -f "$(dirname "$local_box_file")"/added-*
            touch "$stamp"
        }
        timed "vagrant box add" add_box || die "vagrant box add failed"
    fi
fi

# --- 4. up and the two runs ---------------------------------------------------------
: >"$LAYERFS_VM_SERIAL_LOG"
vm_created=1
if ! timed "vagrant up (boot + deps)" vagrant up --provider=libvirt --provision-with "$first_provisioners"; then
    say "the VM did not come up; last lines of its serial console:"
    tail -n 40 "$LAYERFS_VM_SERIAL_LOG" 2>/dev/null | sed 's/^/    /'
    exit 2
fi
root_rc=0
user_rc=0
timed "test-root (make test, CI=true)" vagrant provision --provision-with test-root || root_rc=$?
timed "test-user (pytest -m fuse)" vagrant provision --provision-with test-user || user_rc=$?

# --- 5. the reports -----------------------------------------------------------------
vagrant ssh-config >"$ssh_config"
fetch() { # fetch GUEST_PATH HOST_PATH
    ssh -F "$ssh_config" -o LogLevel=ERROR default sudo cat "$1" >"$2.tmp" && mv "$2.tmp" "$2" || {
        rm -f "$2.tmp"
        echo "vm-test: $1 is missing in the VM" >&2
        return 1
    }
}
root_xml="$reports/vm-$box_key-root.xml"
user_xml="$reports/vm-$box_key-user.xml"
timed "copy the JUnit reports" eval 'fetch /vagrant/reports/junit.xml "$root_xml"; fetch /vagrant/reports/user/junit.xml "$user_xml"' || true

summary() { # summary NAME FILE: one line of counts from a JUnit report
    python3 - "$@" <<'EOF'
import sys
import xml.etree.ElementTree as ET
name, path = sys.argv[1], sys.argv[2]
try:
    root = ET.parse(path).getroot()
except (OSError, ET.ParseError) as err:
    print(f"  {name:6} no report ({err})")
    sys.exit(0)
suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
seconds = sum(float(s.get("time", 0)) for s in suites)
print(f"  {name:6} {count['tests']} tests: {passed} passed, {count['failures']} failed, "
      f"{count['errors']} errors, {count['skipped']} skipped in {seconds:.0f} s ({path})")
EOF
}
say "results in the VM ($box_key, $(virsh dominfo layerfs-default 2>/dev/null | awk '/^CPU\(s\)/{c=$2} /^Max memory/{m=$3/1024} END{printf "%s vCPU, %d MiB", c, m}')):"
summary root "$root_xml"
summary user "$user_xml"

if ((root_rc || user_rc)); then
    say "FAILED: test-root exit $root_rc, test-user exit $user_rc"
    exit 1
fi
say "both runs passed"

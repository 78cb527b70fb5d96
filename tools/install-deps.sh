#!/usr/bin/env bash
# The one install step for layerfs: the Makefile and the Vagrant provisioning
# both run it, and it is idempotent (a second run with nothing to do takes well
# under two seconds).
#
#   1. Debian packages from tools/debian-packages.txt: installs the missing ones
#      as root (apt-get update only when something is missing); as a normal user
#      prints what is missing and the sudo command to install it.
#   2. The fuse kernel module: modprobe fuse, best effort, when /dev/fuse is absent.
#   3. .venv: python3 -m venv and pip install -e '.[fuse,test,dev]', only when
#      .venv is missing or pyproject.toml is newer than .venv/.installed.
#
# Options:
#   --vm         also install the "vm" group (vagrant), for `make vm-test`
#   --venv-only  skip steps 1 and 2 (used by `make unit` and `make lint`)
#   --list       print the package list as "GROUP PACKAGE RECOMMENDS(yes|no)"
#                lines and exit (tools/build-vagrant-box.sh reads it this way)
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
package_list="$repo/tools/debian-packages.txt"
venv="$repo/.venv"
stamp="$venv/.installed"

with_vm=0
venv_only=0
list_only=0
for arg in "$@"; do
    case "$arg" in
        --list) list_only=1 ;;
        --vm) with_vm=1 ;;
        --venv-only) venv_only=1 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "install-deps: error: unknown option '$arg'" >&2; exit 2 ;;
    esac
done

say() { echo "install-deps: $*"; }
warn() { echo "install-deps: warning: $*" >&2; }
die() { echo "install-deps: error: $*" >&2; exit 1; }

# --- 1. Debian packages ----------------------------------------------------

# Prints "GROUP PACKAGE RECOMMENDS" for every package in the list; RECOMMENDS is
# "no" under a "#@ GROUP no-recommends" line, else "yes".
read_package_list() {
    local group="" recommends=yes line
    while IFS= read -r line || [[ -n "$line" ]]; do
        if [[ "$line" =~ ^#@[[:space:]]*([A-Za-z0-9_-]+)[[:space:]]*([A-Za-z-]*) ]]; then
            group=${BASH_REMATCH[1]}
            case "${BASH_REMATCH[2]}" in
                "") recommends=yes ;;
                no-recommends) recommends=no ;;
                *) die "$package_list: unknown group option '${BASH_REMATCH[2]}'" ;;
            esac
            continue
        fi
        line=${line%%#*}
        line=${line//[[:space:]]/}
        [[ -n "$line" ]] || continue
        [[ -n "$group" ]] || die "$package_list: package '$line' is in no group (#@ build|test|vm)"
        echo "$group $line $recommends"
    done <"$package_list"
}

# Prints the packages among "$@" that dpkg does not have fully installed.
missing_packages() {
    local -A installed=()
    local pkg status
    # One dpkg-query call for all of them; unknown names only go to stderr.
    while read -r pkg status; do
        [[ "$status" == "install ok installed" ]] && installed[$pkg]=1
    done < <(dpkg-query -W -f='${Package} ${Status}\n' "$@" 2>/dev/null || true)
    for pkg in "$@"; do
        [[ -n "${installed[$pkg]:-}" ]] || echo "$pkg"
    done
}

# apt_install [--no-install-recommends] PACKAGE...
apt_install() {
    # Without systemd (containers, CI sandboxes) a package's init script would
    # start its daemon (dockerd, docker-registry) right here; tests start their
    # own instead. policy-rc.d exit 101 = "do not start services".
    local policy=/usr/sbin/policy-rc.d made_policy=0
    if [[ ! -d /run/systemd/system && ! -e "$policy" ]]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
    fi
    local rc=0
    {
        say "apt-get update"
        apt-get update -q
        say "apt-get install $*"
        apt-get install -y -q "$@"
    } || rc=$?
    if ((made_policy)); then rm -f "$policy"; fi
    return "$rc"
}

# Sets need_venv_install=1 when .venv must be (re)built.
check_venv() {
    need_venv_install=0
    if [[ ! -x "$venv/bin/python" || ! -f "$stamp" ]]; then
        need_venv_install=1
    elif [[ "$repo/pyproject.toml" -nt "$stamp" ]]; then
        need_venv_install=1
    elif [[ "$(cat "$stamp")" != "$(wanted_extras)" ]]; then
        need_venv_install=1
    elif ! "$venv/bin/python" -c '' 2>/dev/null; then
        need_venv_install=1 # its interpreter was removed or upgraded away
    elif compgen -G "$venv/lib/python3*/site-packages/__editable___layerfs_*_finder.py" >/dev/null; then
        need_venv_install=1 # installed with the import hook: slow start-up (see below)
    fi
}

# pyfuse3 (the second mount engine) builds against libfuse3; without it, install the rest:
# the store, the transports, the native mount engine and the unit tests still work.
wanted_extras() {
    if pkg-config --exists fuse3 2>/dev/null; then echo "fuse,test,dev"; else echo "test,dev"; fi
}

install_packages() {
    local -a build=() test=() vm=()
    local -A no_recommends=()
    local group pkg recommends
    while read -r group pkg recommends; do
        case "$group" in
            build) build+=("$pkg") ;;
            test) test+=("$pkg") ;;
            vm) if ((with_vm)); then vm+=("$pkg"); else continue; fi ;;
            *) die "$package_list: unknown group '$group'" ;;
        esac
        if [[ "$recommends" == no ]]; then no_recommends[$pkg]=1; fi
    done < <(read_package_list)

    if ! command -v dpkg-query >/dev/null; then
        warn "not a Debian/Ubuntu system; install the equivalents of these by hand:"
        warn "  ${build[*]} ${test[*]} ${vm[*]}"
        return 0
    fi

    local -a missing_build missing_all
    mapfile -t missing_build < <(missing_packages "${build[@]}")
    mapfile -t missing_all < <(missing_packages "${build[@]}" "${test[@]}" "${vm[@]}")
    if ((${#missing_all[@]} == 0)); then
        say "all $((${#build[@]} + ${#test[@]} + ${#vm[@]})) Debian packages are installed"
        return 0
    fi

    if [[ $(id -u) -eq 0 ]]; then
        export DEBIAN_FRONTEND=noninteractive NEEDRESTART_SUSPEND=1
        local -a with_rec=() without_rec=()
        for pkg in "${missing_all[@]}"; do
            if [[ -n "${no_recommends[$pkg]:-}" ]]; then without_rec+=("$pkg"); else with_rec+=("$pkg"); fi
        done
        if ((${#with_rec[@]})); then
            apt_install "${with_rec[@]}" || die "apt-get install failed"
        fi
        if ((${#without_rec[@]})); then
            apt_install --no-install-recommends "${without_rec[@]}" || die "apt-get install failed"
        fi
        return 0
    fi

    say "missing Debian packages: ${missing_all[*]}"
    say "install them with:"
    echo "    sudo apt-get install ${missing_all[*]}"
    check_venv
    if ((${#missing_build[@]})) && ((need_venv_install)); then
        die "building .venv needs ${missing_build[*]}; install them and run this again"
    fi
    say "continuing: integration tests that need them will skip (and fail under CI)"
}

ensure_fuse_module() {
    [[ -e /dev/fuse ]] && return 0
    if command -v modprobe >/dev/null; then
        if [[ $(id -u) -eq 0 ]]; then modprobe fuse 2>/dev/null || true; fi
    fi
    [[ -e /dev/fuse ]] || warn "/dev/fuse is missing (modprobe fuse as root); FUSE tests will skip"
}

# --- 3. the virtual environment -------------------------------------------

install_venv() {
    check_venv
    if ((!need_venv_install)); then
        say ".venv is up to date"
        return 0
    fi
    command -v python3 >/dev/null || die "python3 is not on PATH"
    python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
        die "layerfs needs Python >= 3.11; python3 on PATH is $(python3 -V 2>&1)"
    if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c '' 2>/dev/null; then
        say "creating $venv"
        rm -rf "$venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (apt-get install python3-venv)"
    fi
    local extras
    extras=$(wanted_extras)
    [[ "$extras" == *fuse* ]] ||
        warn "libfuse3 not found by pkg-config: installing without pyfuse3 (mounts use the native engine only)"
    say "pip install -e '.[$extras]'"
    rm -f "$stamp"
    # editable_mode=compat: a plain path in a .pth file. The default mode installs an import
    # hook whose own imports (pathlib, importlib.util) cost every layerfs command ~25 ms of
    # start-up, more than the commands themselves (docs/benchmarks.md, "Start-up").
    (cd "$repo" && "$venv/bin/python" -m pip install --disable-pip-version-check -q \
        --config-settings editable_mode=compat -e ".[$extras]") ||
        die "pip install failed"
    echo "$extras" >"$stamp"
    say ".venv is ready"
}

if ((list_only)); then
    read_package_list
    exit 0
fi
if ((!venv_only)); then
    install_packages
    ensure_fuse_module
fi
install_venv
# Byte-compile the package: where PYTHONDONTWRITEBYTECODE is set, Python would
# otherwise compile every module on each command (about 0.3 s per command).
"$venv/bin/python" -m compileall -q "$repo/layerfs" >/dev/null || true

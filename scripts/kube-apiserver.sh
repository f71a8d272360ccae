#!/usr/bin/env bash
# Installs what the webhook's real-API-server tests need, idempotently:
#   - etcd (Debian's etcd-server);
#   - kube-apiserver and kube-controller-manager, built from Debian's `kubernetes` source package
#     (scripts/lib/kube-source.sh: no package ships the binaries; the source tree vendors
#     everything and builds offline with Debian's Go, with one fix: reflect2 1.0.2 in place of the
#     vendored 1.0.1, which crashes when built with Go >= 1.18). A cold build takes 7-10 minutes
#     on 2 cores, so the binaries are cached outside the work tree in $KUBE_TEST_CACHE (default
#     /var/cache/keyd-test/kube-1.20) and reused. The cache holds a BUILD stamp so that a cache
#     from an unpatched build is rebuilt.
# scripts/kube-node.sh builds kubelet and kube-scheduler the same way, into a cache of its own.
# The tests find the binaries through KUBE_TEST_APISERVER / KUBE_TEST_ETCD, or in the default cache
# and on PATH.
# Needs root for apt-get; prints the cache directory on success.
set -euo pipefail
# shellcheck source=lib/kube-source.sh
. "$(dirname "$0")/lib/kube-source.sh"

cache="${KUBE_TEST_CACHE:-/var/cache/keyd-test/kube-1.20}"
build_id="kubernetes-1.20 reflect2-1.0.2"
built() {
    [ -x "${cache}/kube-apiserver" ] && [ -x "${cache}/kube-controller-manager" ] \
        && [ "$(cat "${cache}/BUILD" 2>/dev/null)" = "${build_id}" ]
}

if built && command -v etcd >/dev/null 2>&1; then
    echo "${cache}"
    exit 0
fi

mkdir -p "$(dirname "${cache}")"
# Two runs at once (two worktrees, a CI retry) would build twice and race on the cache.
exec 9>"$(dirname "${cache}")/.kube-build.lock"
flock 9
if built && command -v etcd >/dev/null 2>&1; then
    echo "${cache}"
    exit 0
fi

mapfile -t pkgs < <(kube_build_packages)
command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "==> installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends "${pkgs[@]}" >&2
fi

if built; then
    echo "${cache}"
    exit 0
fi

kube_build "${cache}" "${build_id}" kube-apiserver kube-controller-manager
echo "${cache}"

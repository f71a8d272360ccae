#!/usr/bin/env bash
# Installs what the one-node kubelet cluster (tests/src/kubelet/) needs besides the API server,
# idempotently: kubelet and kube-scheduler, built from Debian's `kubernetes` source package the
# same way, and with the same reflect2 fix, as scripts/kube-apiserver.sh builds kube-apiserver
# (scripts/lib/kube-source.sh). A cold build takes about 15 CPU-minutes: measured 17-19 minutes
# on 2 cores that another build was sharing (alone, expect about half). So the binaries are cached
# outside the work tree in $KUBE_NODE_CACHE (default /var/cache/keyd-test/kube-node-1.20, 145 MB)
# with a BUILD stamp of their own: building them never invalidates kube-apiserver's cache.
# The tests find the binaries through KUBE_TEST_KUBELET / KUBE_TEST_SCHEDULER, or in that cache.
# Needs root for apt-get; prints the cache directory on success.
set -euo pipefail
# shellcheck source=lib/kube-source.sh
. "$(dirname "$0")/lib/kube-source.sh"

cache="${KUBE_NODE_CACHE:-/var/cache/keyd-test/kube-node-1.20}"
build_id="kubernetes-1.20 reflect2-1.0.2"
built() {
    [ -x "${cache}/kubelet" ] && [ -x "${cache}/kube-scheduler" ] \
        && [ "$(cat "${cache}/BUILD" 2>/dev/null)" = "${build_id}" ]
}

if built; then
    echo "${cache}"
    exit 0
fi

mkdir -p "$(dirname "${cache}")"
# The lock kube-apiserver.sh takes: two Kubernetes builds at once on 2 cores would each take twice
# as long, and two runs of this one (two worktrees, a CI retry) would race on the cache.
exec 9>"$(dirname "${cache}")/.kube-build.lock"
flock 9
if built; then
    echo "${cache}"
    exit 0
fi

mapfile -t pkgs < <(kube_build_packages)
if [ "${#pkgs[@]}" -gt 0 ]; then
    echo "==> installing ${pkgs[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >&2
    apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends "${pkgs[@]}" >&2
fi

kube_build "${cache}" "${build_id}" kubelet kube-scheduler
echo "${cache}"

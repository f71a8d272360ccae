#!/usr/bin/env bash
# Installs what the webhook's real-API-server tests need, idempotently:
#   - etcd (Debian's etcd-server);
#   - kube-apiserver and kube-controller-manager, built from Debian's `kubernetes` source package
#     (no package ships the binaries; the source tree vendors everything and builds offline with
#     Debian's Go). A cold build takes 7-10 minutes on 2 cores, so the binaries are cached outside
#     the work tree in $KUBE_TEST_CACHE (default /var/cache/keyd-test/kube-1.20) and reused.
#
# One source change: Kubernetes 1.20 vendors modern-go/reflect2 1.0.1, which crashes the API
# server (SIGSEGV in map iteration, e.g. on every custom-resource create) when built with Go 1.18
# or newer, as Debian 12's Go (1.19) is. The build replaces it with Debian's reflect2 1.0.2, the
# release that fixed exactly this (Kubernetes itself moved to it in 1.23). The cache holds a
# BUILD stamp so that a cache from an unpatched build is rebuilt.
# The tests find the binaries through KUBE_TEST_APISERVER / KUBE_TEST_ETCD, or in the default cache
# and on PATH.
# Needs root for apt-get; prints the cache directory on success.
set -euo pipefail
# shellcheck source=lib/apt-mirror.sh
. "$(dirname "$0")/lib/apt-mirror.sh"

cache="${KUBE_TEST_CACHE:-/var/cache/keyd-test/kube-1.20}"
build_id="kubernetes-1.20 reflect2-1.0.2"
log() { printf '==> %s\n' "$*" >&2; }
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

export DEBIAN_FRONTEND=noninteractive
pkgs=()
command -v go >/dev/null 2>&1 || pkgs+=(golang-go)
command -v rsync >/dev/null 2>&1 || pkgs+=(rsync)
command -v etcd >/dev/null 2>&1 || pkgs+=(etcd-server)
command -v make >/dev/null 2>&1 || pkgs+=(make)
command -v dpkg-source >/dev/null 2>&1 || pkgs+=(dpkg-dev)
reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2
[ -f "${reflect2}/go_above_118.go" ] || pkgs+=(golang-github-modern-go-reflect2-dev)
if [ "${#pkgs[@]}" -gt 0 ]; then
    log "installing ${pkgs[*]}"
    apt-get update -qq
    apt-get install -y -qq -o DPkg::Lock::Timeout=900 --no-install-recommends "${pkgs[@]}" >&2
fi

if built; then
    echo "${cache}"
    exit 0
fi

work="$(mktemp -d /var/tmp/keyd-kube-build.XXXXXX)"
trap 'rm -rf "${work}"' EXIT

# A private deb-src list so the machine's own apt configuration is left untouched. The mirror is
# the one the system already uses for bookworm main (one-line or deb822 sources), never a
# built-in address: with none, stop and say which files were read.
mirror="$(debian_mirror)"
mkdir -p "${work}/apt/lists/partial"
echo "deb-src ${mirror} bookworm main" >"${work}/apt/sources.list"
apt_opts=(-o "Dir::Etc::SourceList=${work}/apt/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=${work}/apt/lists")
log "fetching the kubernetes source package from ${mirror}"
apt-get "${apt_opts[@]}" update -qq >&2
(cd "${work}" && apt-get "${apt_opts[@]}" source --download-only kubernetes >&2)
(cd "${work}" && dpkg-source --no-check -x kubernetes_*.dsc src >&2)

export GOPATH="${work}/go"
mkdir -p "${GOPATH}/src/k8s.io"
mv "${work}/src" "${GOPATH}/src/k8s.io/kubernetes"
log "replacing vendored modern-go/reflect2 1.0.1 with Debian's 1.0.2 (Go >= 1.18 fix)"
rsync -a --delete --exclude '*_test.go' "${reflect2}/" \
    "${GOPATH}/src/k8s.io/kubernetes/vendor/github.com/modern-go/reflect2/"
log "building kube-apiserver and kube-controller-manager (7-10 minutes on 2 cores)"
(
    cd "${GOPATH}/src/k8s.io/kubernetes"
    GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on CGO_ENABLED=0 GOCACHE="${work}/gocache" \
        make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" >&2
)
out="${GOPATH}/src/k8s.io/kubernetes/_output/bin"
mkdir -p "${cache}.tmp"
install -m 0755 "${out}/kube-apiserver" "${out}/kube-controller-manager" "${cache}.tmp/"
echo "${build_id}" >"${cache}.tmp/BUILD"
rm -rf "${cache}"
mv "${cache}.tmp" "${cache}"
log "cached in ${cache}"
echo "${cache}"

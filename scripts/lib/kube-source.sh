# Sourced by scripts/kube-apiserver.sh and scripts/kube-node.sh (not run on its own).
#
# kube_build CACHE BUILD_ID CMD...: builds the Kubernetes commands CMD (e.g. kube-apiserver, as
# under cmd/ in the tree) from Debian's `kubernetes` source package (1.20) and installs them,
# with BUILD_ID in a BUILD stamp, into CACHE (replaced whole, so a half-built cache never
# exists). Prints progress on stderr. The caller holds the build lock and has installed what
# kube_build_packages lists.
#
# No package ships the binaries; the source tree vendors everything and builds offline with
# Debian's Go. One source change: Kubernetes 1.20 vendors modern-go/reflect2 1.0.1, which crashes
# (SIGSEGV in map iteration, e.g. kube-apiserver on every custom-resource create) when built with
# Go 1.18 or newer, as Debian 12's Go (1.19) is. The build replaces it with Debian's reflect2
# 1.0.2, the release that fixed exactly this (Kubernetes itself moved to it in 1.23).
# shellcheck source=apt-mirror.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt-mirror.sh"

kube_reflect2=/usr/share/gocode/src/github.com/modern-go/reflect2

# kube_build_packages: prints the Debian packages the build needs that are missing, one a line.
kube_build_packages() {
    command -v go >/dev/null 2>&1 || echo golang-go
    command -v rsync >/dev/null 2>&1 || echo rsync
    command -v make >/dev/null 2>&1 || echo make
    command -v dpkg-source >/dev/null 2>&1 || echo dpkg-dev
    [ -f "${kube_reflect2}/go_above_118.go" ] || echo golang-github-modern-go-reflect2-dev
}

kube_build() {
    local cache="$1" build_id="$2"
    shift 2
    local what=() cmd
    for cmd in "$@"; do what+=("cmd/${cmd}"); done
    local work
    work="$(mktemp -d /var/tmp/keyd-kube-build.XXXXXX)"
    # (A subshell, so that its EXIT trap removes the work tree whatever happens.)
    (
        trap 'rm -rf "${work}"' EXIT
        # A private deb-src list so the machine's own apt configuration is left untouched. The
        # mirror is the one the system already uses for bookworm main (one-line or deb822
        # sources), never a built-in address: with none, stop and say which files were read.
        local mirror
        mirror="$(debian_mirror)"
        mkdir -p "${work}/apt/lists/partial"
        echo "deb-src ${mirror} bookworm main" >"${work}/apt/sources.list"
        local apt_opts=(-o "Dir::Etc::SourceList=${work}/apt/sources.list"
            -o "Dir::Etc::SourceParts=/dev/null" -o "Dir::State::Lists=${work}/apt/lists")
        echo "==> fetching the kubernetes source package from ${mirror}" >&2
        apt-get "${apt_opts[@]}" update -qq >&2
        (cd "${work}" && apt-get "${apt_opts[@]}" source --download-only kubernetes >&2)
        (cd "${work}" && dpkg-source --no-check -x kubernetes_*.dsc src >&2)

        export GOPATH="${work}/go"
        mkdir -p "${GOPATH}/src/k8s.io"
        mv "${work}/src" "${GOPATH}/src/k8s.io/kubernetes"
        echo "==> replacing vendored modern-go/reflect2 1.0.1 with Debian's 1.0.2 (Go >= 1.18 fix)" >&2
        rsync -a --delete --exclude '*_test.go' "${kube_reflect2}/" \
            "${GOPATH}/src/k8s.io/kubernetes/vendor/github.com/modern-go/reflect2/"
        echo "==> building $* (minutes on 2 cores)" >&2
        (
            cd "${GOPATH}/src/k8s.io/kubernetes"
            GOPROXY=off GOFLAGS=-mod=vendor GO111MODULE=on CGO_ENABLED=0 \
                GOCACHE="${work}/gocache" make WHAT="${what[*]}" >&2
        )
        local out="${GOPATH}/src/k8s.io/kubernetes/_output/bin"
        rm -rf "${cache}.tmp"
        mkdir -p "${cache}.tmp"
        for cmd in "$@"; do install -m 0755 "${out}/${cmd}" "${cache}.tmp/"; done
        echo "${build_id}" >"${cache}.tmp/BUILD"
        rm -rf "${cache}"
        mv "${cache}.tmp" "${cache}"
        echo "==> cached in ${cache}" >&2
    )
}

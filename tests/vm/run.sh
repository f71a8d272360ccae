#!/usr/bin/env bash
# Boots Debian's kernel (which has WireGuard and ESP) under QEMU with virtme-ng and runs
# tests/vm/guest.sh in it: node-shim end to end in both modes, the policy phases, then the
# benchmarks.
#   KUBE_CLUSTER=PATH KUBE_TEST_APISERVER=PATH tests/vm/run.sh BIN_DIR OUT_DIR [e2e] [policy] [bench]
# e2e and policy need KUBE_CLUSTER (keyd-tests' kube-cluster binary) and KUBE_TEST_APISERVER (the
# kube-apiserver that scripts/kube-apiserver.sh builds; its folder is shared with the guest).
# One boot for everything: a boot costs about a minute under TCG emulation.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
BIN=$(cd "$1" && pwd)
mkdir -p "$2"
OUT=$(cd "$2" && pwd)
shift 2

kernel=$(ls -1 /boot/vmlinuz-*-amd64 2>/dev/null | sort -V | tail -n 1 || true)
if [ -z "$kernel" ]; then
    echo "no Debian kernel under /boot (apt-get install linux-image-amd64)" >&2
    exit 2
fi
echo "booting $kernel"
# --disable-kvm: nested KVM hangs at early boot on these machines. The guest sees the host's
# root file system read-only; OUT_DIR is shared writable.
# The console goes to a file, not to our stdout: written straight to a stdout that was a file
# (a CI log), it overwrote the log from its start, losing everything cargo had printed before.
# Its readable lines are printed afterwards.
rc=0
# The policy phase runs etcd and kube-apiserver in the guest beside keyd and two node-shims.
# The guest does not see the host's /var/cache, where scripts/kube-apiserver.sh caches the API
# server: its folder is shared read-only.
dirs=(--rwdir "$OUT")
if [ -n "${KUBE_TEST_APISERVER:-}" ]; then
    dirs+=(--rodir "$(dirname "$KUBE_TEST_APISERVER")")
fi
timeout 2400 vng -r "$kernel" --disable-kvm --memory 3G --cpus 2 \
    "${dirs[@]}" \
    --exec "env KUBE_CLUSTER=${KUBE_CLUSTER:-} KUBE_TEST_APISERVER=${KUBE_TEST_APISERVER:-} $here/guest.sh $BIN $OUT $*" > "$OUT/console.log" 2>&1 || rc=$?
sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$OUT/console.log" | tr -d '\r' | grep -av '^[[:space:]]*$' | tail -n 300 || true
exit "$rc"

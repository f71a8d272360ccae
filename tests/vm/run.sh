#!/usr/bin/env bash
# Boots Debian's kernel (which has WireGuard and ESP) under QEMU with virtme-ng and runs
# tests/vm/guest.sh in it: node-shim end to end in both modes, then the benchmark.
#   tests/vm/run.sh BIN_DIR OUT_DIR [e2e] [bench]
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
timeout 1500 vng -r "$kernel" --disable-kvm --memory 2G --cpus 2 \
    --rwdir "$OUT" \
    --exec "$here/guest.sh $BIN $OUT $*" > "$OUT/console.log" 2>&1 || rc=$?
sed 's/\x1b\[[0-9;?]*[A-Za-z]//g' "$OUT/console.log" | tr -d '\r' | grep -av '^[[:space:]]*$' | tail -n 300 || true
exit "$rc"

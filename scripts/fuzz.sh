#!/usr/bin/env bash
# Builds the cargo-fuzz targets in fuzz/ (one per parser of untrusted input) on stable Rust and
# runs each for a bounded time over a temporary copy of its committed seed corpus
# (fuzz/corpus/TARGET), so the tree is left as it was. Prints per target the executions, the
# corpus size and the result; any crash, panic, timeout or out-of-memory input fails the script
# and the reproducing input is named (its directory is kept).
#
#   FUZZ_SECONDS=20   seconds each target runs (libFuzzer's -max_total_time)
#   FUZZ_TARGETS="a b" only these targets (default: every target `cargo fuzz list` names)
#
#   FUZZ_PROFILE=release  release (the default: about 20 times the executions per second) or dev
#                         (the test command's: builds in about 4 minutes cold instead of 15-20)
#
# The build (instrumented, with debug assertions and overflow checks) is cached outside
# the tree in ${XDG_CACHE_HOME:-~/.cache}/keyd-test/fuzz-target; about 20 minutes cold on 2 cores,
# seconds when only this project's crates changed.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '\n==> %s\n' "$*"; }

seconds="${FUZZ_SECONDS:-20}"
case "$seconds" in
    '' | *[!0-9]*) echo "FUZZ_SECONDS must be a whole number of seconds, not '$seconds'" >&2; exit 64 ;;
esac
export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/keyd-test/fuzz-target"
# Cargo never removes the artifacts of earlier sources, so a long-lived cache only grows (by
# ~0.5 GB per changed build); past FUZZ_CACHE_MAX_GB (default 12) it is started afresh.
case "${FUZZ_CACHE_MAX_GB:-12}" in
    ''|*[!0-9]*) echo "FUZZ_CACHE_MAX_GB must be a whole number of GB" >&2; exit 64 ;;
esac
if [ -d "$CARGO_TARGET_DIR" ]; then
    # du may meet a file that vanishes mid-walk; its total is still good enough here.
    cache_kb=$(du -sk "$CARGO_TARGET_DIR" 2>/dev/null | cut -f1 || true)
    cache_gb=$(( ${cache_kb:-0} / 1024 / 1024 ))
    if [ "$cache_gb" -ge "${FUZZ_CACHE_MAX_GB:-12}" ]; then
        echo "fuzz build cache $CARGO_TARGET_DIR holds ${cache_gb} GB: removing it" >&2
        rm -rf "$CARGO_TARGET_DIR"
    fi
fi
# Stable Rust: no sanitizer (ASan needs nightly); debug assertions turn overflow into a panic.
profile="${FUZZ_PROFILE:-release}"
case "$profile" in
    release) build_flags=(--fuzz-dir fuzz --sanitizer none --debug-assertions) ;;
    dev) build_flags=(--fuzz-dir fuzz --sanitizer none --dev) ;;
    *) echo "FUZZ_PROFILE must be release or dev, not '$profile'" >&2; exit 64 ;;
esac

if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz (cargo install --locked)"
    cargo install cargo-fuzz --locked
fi

log "cargo fmt --check (fuzz/, its own workspace)"
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

log "building the fuzz targets (cargo fuzz build ${build_flags[*]})"
timeout 3600 cargo fuzz build "${build_flags[@]}"

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
fi
profile_dir=release
[ "$profile" = dev ] && profile_dir=debug
bin_dir="${CARGO_TARGET_DIR}/$(rustc -vV | sed -n 's/^host: //p')/${profile_dir}"
work="$(mktemp -d "${TMPDIR:-/tmp}/keyd-fuzz.XXXXXX")"
failed=0

rows=()
for t in "${targets[@]}"; do
    seeds="fuzz/corpus/$t"
    if [ ! -d "$seeds" ] || [ ! -x "$bin_dir/$t" ]; then
        echo "no seed corpus ($seeds) or no binary for target $t" >&2
        exit 1
    fi
    mkdir -p "$work/$t/corpus" "$work/$t/artifacts"
    cp -R "$seeds/." "$work/$t/corpus/"
    log "fuzzing $t for ${seconds} s"
    status=0
    # -timeout: one input taking longer is a finding (a parser must not hang on its input).
    # The outer timeout bounds the run even if libFuzzer itself stops responding.
    timeout --kill-after=10 "$((seconds + 120))" "$bin_dir/$t" \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        -artifact_prefix="$work/$t/artifacts/" "$work/$t/corpus" \
        >"$work/$t/log" 2>&1 || status=$?
    runs="$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$work/$t/log" | tail -n 1)"
    [ -n "$runs" ] || runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$t/log" | tail -n 1)"
    corpus="$(find "$work/$t/corpus" -type f | wc -l)"
    mapfile -t found < <(find "$work/$t/artifacts" -type f)
    if [ "$status" -eq 0 ] && [ "${#found[@]}" -eq 0 ]; then
        result=ok
    else
        failed=1
        if [ "${#found[@]}" -gt 0 ]; then
            result="FAILED: ${#found[@]} input(s)"
        elif [ "$status" -eq 124 ] || [ "$status" -eq 137 ]; then
            result="FAILED: did not stop in time"
        else
            result="FAILED: exit $status"
        fi
        tail -n 40 "$work/$t/log" >&2
        for f in "${found[@]}"; do
            echo "reproduce: $bin_dir/$t $f   (or: cargo fuzz run ${build_flags[*]} $t $f)" >&2
        done
    fi
    rows+=("$(printf '%-20s %12s %8s  %s' "$t" "${runs:-?}" "$corpus" "$result")")
done

log "fuzzing summary (${seconds} s per target)"
printf '%-20s %12s %8s  %s\n' TARGET EXECUTIONS CORPUS RESULT
printf '%s\n' "${rows[@]}"
if [ "$failed" -ne 0 ]; then
    echo "fuzzing found failures; logs and inputs kept in $work" >&2
    exit 1
fi
rm -rf "$work"

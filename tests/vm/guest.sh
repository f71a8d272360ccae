#!/bin/bash
# Runs inside the virtme-ng guest (Debian's kernel, which has WireGuard and ESP), as root:
#   guest.sh BIN_DIR OUT_DIR [e2e] [bench]
# BIN_DIR holds keyd, keyctl, node-shim and node-shim-bench (release builds from the host's
# target directory, which the guest sees). OUT_DIR is writable and shared with the host.
#
# End to end: keyd in the root namespace; two "nodes" (network namespaces node-a, node-b)
# joined by an underlay veth, each with a "pod" namespace behind it, each running node-shim.
# For WireGuard, then IPsec: pod-to-pod traffic works; a capture on the underlay shows only
# WireGuard UDP / ESP and never the plaintext marker; a TCP stream survives a key rotation
# without a reset; after the rotation the old public key / old SPI is gone from the kernel; and
# a node-shim restart adopts the kernel's state without changing it.
#
# Results go to OUT_DIR/results.txt as KEY=VALUE lines; the last line is VM-E2E: PASS.
set -euo pipefail

BIN=$1
OUT=$2
shift 2
WHAT=${*:-e2e bench}
RES=$OUT/results.txt
: > "$RES"
LOGS=$OUT/logs
mkdir -p "$LOGS"

log() { printf '[guest %s] %s\n' "$(date +%T)" "$*"; }
result() { echo "$1=$2" | tee -a "$RES"; }
fail() {
    log "FAIL: $*"
    echo "VM-E2E: FAIL $*" >> "$RES"
    for f in "$LOGS"/*.log; do
        echo "----- $f (tail)"
        tail -n 30 "$f" || true
    done
    exit 1
}
# wait_for SECONDS DESCRIPTION COMMAND...: polls every 0.2 s.
wait_for() {
    local secs=$1 what=$2
    shift 2
    local deadline=$((SECONDS + secs))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then fail "timed out after ${secs}s waiting for: $what"; fi
        sleep 0.2
    done
}
ns() { ip netns exec "$@"; }

log "kernel $(uname -r)"
for m in wireguard esp4 xfrm_user xfrm4_tunnel cls_flower act_skbedit sch_ingress bridge veth; do
    modprobe "$m" 2>/dev/null || true
done

topology() {
    for n in node-a node-b pod-a pod-b; do ip netns add "$n"; ns "$n" ip link set lo up; done
    # Management network: keyd in the root namespace on a bridge, nodes attached to it.
    ip link add br-mgmt type bridge
    ip addr add 172.31.0.1/24 dev br-mgmt
    ip link set br-mgmt up
    local i=2
    for n in a b; do
        ip link add "mg-$n" type veth peer name mgmt netns "node-$n"
        ip link set "mg-$n" master br-mgmt up
        ns "node-$n" ip addr add "172.31.0.$i/24" dev mgmt
        ns "node-$n" ip link set mgmt up
        i=$((i + 1))
    done
    # Underlay between the nodes, through a "wire" namespace whose bridge the capture watches:
    # it sees exactly the frames on the link. (A capture on a node's own interface also shows
    # inbound ESP after decryption, since tunnel mode re-injects the inner packet there.)
    ip netns add wire
    ns wire ip link add br0 type bridge
    ns wire ip link set br0 up
    for n in a b; do
        ns "node-$n" ip link add ul type veth peer name "w$n" netns wire
        ns wire ip link set "w$n" master br0 up
        ns "node-$n" ip link set ul up
    done
    ns node-a ip addr add 192.168.100.1/24 dev ul
    ns node-b ip addr add 192.168.100.2/24 dev ul
    # Pods.
    local sub=1
    for n in a b; do
        ns "node-$n" ip link add pod type veth peer name eth0 netns "pod-$n"
        ns "node-$n" ip addr add "10.$sub.0.1/24" dev pod
        ns "node-$n" ip link set pod up
        ns "pod-$n" ip addr add "10.$sub.0.2/24" dev eth0
        ns "pod-$n" ip link set eth0 up
        ns "pod-$n" ip route add default via "10.$sub.0.1"
        ns "node-$n" sysctl -qw net.ipv4.ip_forward=1
        ns "node-$n" sysctl -qw net.ipv4.conf.all.rp_filter=0
        sub=$((sub + 1))
    done
}

KEYD_DIR=/tmp/keyd-e2e
start_keyd() {
    rm -rf "$KEYD_DIR"
    run_keyd
}
# keyd on the data directory as it is (a restart keeps every key and certificate).
run_keyd() {
    "$BIN/keyd" dev --data-dir "$KEYD_DIR" --listen 172.31.0.1:8443 --ops-listen 127.0.0.1:9443 \
        >> "$LOGS/keyd.log" 2>&1 &
    KEYD_PID=$!
    wait_for 60 "keyd ready" curl -sf http://127.0.0.1:9443/readyz
}
# Retried when keyd is unreachable (exit 3): under emulation on a busy host a TLS handshake can
# exceed keyd's 10 s handshake timeout.
keyctl() {
    local attempt rc
    for attempt in 1 2 3; do
        rc=0
        "$BIN/keyctl" --config "$KEYD_DIR/keyctl.toml" "$@" || rc=$?
        [ "$rc" -eq 3 ] || return "$rc"
        log "keyctl $1: keyd unreachable (attempt $attempt)"
        sleep 2
    done
    return 3
}

# node_config NODE IP CIDR MODE PORT
node_config() {
    local node=$1 ip=$2 cidr=$3 mode=$4 port=$5
    cat > "/tmp/$node-$mode.toml" <<EOF
node_name = "$node"
endpoint = "$ip"
pod_cidrs = ["$cidr"]
mode = "$mode"
poll_interval = "1s"
backoff_initial = "200ms"
backoff_max = "2s"
ops_listen = "127.0.0.1:$port"
[keyd]
server = "https://172.31.0.1:8443"
ca = "$KEYD_DIR/pki/ca.pem"
cert = "$KEYD_DIR/pki/node-$node.pem"
key = "$KEYD_DIR/pki/node-$node-key.pem"
[wireguard]
backend = "kernel"
[ipsec]
outbound_switch_delay = "3s"
[log]
format = "text"
level = "info"
EOF
}

declare -A SHIM_PID
start_shim() {
    local node=$1 mode=$2
    # Not through the `ns` function: a function in the background runs in a subshell, and the
    # signals below must reach node-shim itself (`ip netns exec` execs it in place).
    ip netns exec "$node" "$BIN/node-shim" --config "/tmp/$node-$mode.toml" >> "$LOGS/$node-$mode.log" 2>&1 &
    SHIM_PID[$node]=$!
}
stop_shim() {
    local node=$1
    kill -TERM "${SHIM_PID[$node]}" 2>/dev/null || true
    wait "${SHIM_PID[$node]}" 2>/dev/null || true
}
port_of() { [ "$1" = node-a ] && echo 9101 || echo 9102; }
status_of() { ns "$1" curl -sf "http://127.0.0.1:$(port_of "$1")/status"; }
# Matching on captured output, not in a pipe: `cmd | grep -q` can fail under pipefail when
# grep stops reading early.
status_has() {
    local s
    s=$(status_of "$1") && [[ $s == *"$2"* ]]
}
no_kernel_ops() {
    local m
    m=$(metrics_of "$1") && [[ $m != *node_shim_kernel_ops_total* ]]
}
metrics_of() { ns "$1" curl -sf "http://127.0.0.1:$(port_of "$1")/metrics"; }

# A TCP stream pod-a -> pod-b carrying the marker ten times a second until $OUT/stream.on goes.
start_stream() {
    local tag=$1
    rm -f "$OUT/$tag-recv.txt"
    ip netns exec pod-b socat -u TCP-LISTEN:7000,reuseaddr "OPEN:$OUT/$tag-recv.txt,creat,trunc" \
        > "$LOGS/$tag-server.log" 2>&1 &
    STREAM_SERVER=$!
    sleep 0.5
    touch "$OUT/stream.on"
    (
        i=0
        while [ -e "$OUT/stream.on" ]; do
            echo "KEYD-PLAINTEXT-MARKER $i"
            i=$((i + 1))
            sleep 0.1
        done
    ) | ip netns exec pod-a socat -u - TCP:10.2.0.2:7000 > "$LOGS/$tag-client.log" 2>&1 &
    STREAM_CLIENT=$!
}
stop_stream() {
    local tag=$1
    rm -f "$OUT/stream.on"
    local rc=0
    wait "$STREAM_CLIENT" || rc=$?
    wait "$STREAM_SERVER" || true
    [ "$rc" -eq 0 ] || fail "$tag: the TCP stream was reset (client exit $rc): $(cat "$LOGS/$tag-client.log")"
    local lines last
    lines=$(wc -l < "$OUT/$tag-recv.txt")
    last=$(tail -n 1 "$OUT/$tag-recv.txt" | awk '{print $2}')
    # Every line arrived, in order: the stream never broke.
    [ "$lines" -gt 20 ] && [ "$last" -eq $((lines - 1)) ] ||
        fail "$tag: stream incomplete ($lines lines, last $last)"
    result "${tag}_stream_lines" "$lines"
}

# Background processes are started with `ip netns exec` directly (it execs in place), never
# through the `ns` function: a function in the background is a subshell, which is what a signal
# would reach, and background jobs of a script ignore SIGINT.
start_capture() {
    ip netns exec wire tcpdump --immediate-mode -U -n -s 0 -i br0 -w "$OUT/$1.pcap" > "$LOGS/$1-tcpdump.log" 2>&1 &
    CAPTURE=$!
    sleep 1
}
stop_capture() {
    sleep 0.5
    kill -TERM "$CAPTURE" 2>/dev/null || true
    wait "$CAPTURE" 2>/dev/null || true
}
# check_capture TAG PATTERN: no plaintext marker, and every IPv4 packet matches PATTERN.
check_capture() {
    local tag=$1 pattern=$2
    if grep -qa -e KEYD-PLAINTEXT-MARKER -e KEYD-MARKER "$OUT/$tag.pcap"; then fail "$tag: plaintext marker on the underlay"; fi
    tcpdump -n -r "$OUT/$tag.pcap" 2>/dev/null > "$OUT/$tag.txt"
    local total other
    total=$(grep -c ' IP ' "$OUT/$tag.txt" || true)
    other=$(grep ' IP ' "$OUT/$tag.txt" | grep -cv -- "$pattern" || true)
    [ "$total" -gt 50 ] || fail "$tag: too few packets captured ($total)"
    [ "$other" -eq 0 ] || fail "$tag: $other packet(s) on the underlay are not $pattern: $(grep ' IP ' "$OUT/$tag.txt" | grep -v -- "$pattern" | head -3)"
    result "${tag}_captured_packets" "$total"
}

# A ping at 50 ms intervals carrying the marker (echoed back by pod-b); its longest run of lost
# replies and its slowest reply are the disruption (WireGuard queues packets while it
# handshakes, so a rotation shows as delay more than as loss).
start_probe() {
    ip netns exec pod-a ping -n -i 0.05 -W 2 -p 4b4559442d4d41524b4552 10.2.0.2 > "$OUT/$1-ping.txt" 2>&1 &
    PROBE=$!
}
stop_probe() {
    local tag=$1
    kill -TERM "$PROBE" 2>/dev/null || true
    wait "$PROBE" 2>/dev/null || true
    local worst
    worst=$(grep -o 'icmp_seq=[0-9]*' "$OUT/$tag-ping.txt" | cut -d= -f2 | sort -n |
        awk 'NR > 1 && $1 - prev > max { max = $1 - prev } { prev = $1 } END { print (max > 1 ? max - 1 : 0) }')
    result "${tag}_max_lost_pings" "$worst"
    result "${tag}_max_gap_ms" "$((worst * 50))"
    result "${tag}_max_rtt_ms" "$(grep -o 'time=[0-9.]*' "$OUT/$tag-ping.txt" | cut -d= -f2 | sort -n | tail -n 1)"
    result "${tag}_median_rtt_ms" "$(grep -o 'time=[0-9.]*' "$OUT/$tag-ping.txt" | cut -d= -f2 | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')"
    grep -E 'packets transmitted' "$OUT/$tag-ping.txt" | tee -a "$LOGS/$tag-ping-summary.log" || true
}

# Both nodes have new keys, and each lists only the other's new key.
wg_rotated() {
    local new_a new_b peers_a peers_b
    new_a=$(ns node-a wg show keyd-wg0 public-key)
    new_b=$(ns node-b wg show keyd-wg0 public-key)
    peers_a=$(ns node-a wg show keyd-wg0 peers)
    peers_b=$(ns node-b wg show keyd-wg0 peers)
    [ "$new_a" != "$OLD_A" ] && [ "$new_b" != "$OLD_B" ] &&
        [ "$peers_a" = "$new_b" ] && [ "$peers_b" = "$new_a" ]
}

# What each side holds, for a failure: keys and peers, and digests (never the values) of the
# preshared keys.
wg_diagnostics() {
    for n in node-a node-b; do
        echo "== $n" >> "$LOGS/wg-diagnostics.txt"
        ns "$n" wg show keyd-wg0 >> "$LOGS/wg-diagnostics.txt" 2>&1 || true
        echo "psk digest: $(ns "$n" wg show keyd-wg0 preshared-keys | awk '{print $2}' | sha256sum)" >> "$LOGS/wg-diagnostics.txt"
        status_of "$n" >> "$LOGS/wg-diagnostics.txt" || true
        echo >> "$LOGS/wg-diagnostics.txt"
    done
    keyctl nodes >> "$LOGS/wg-diagnostics.txt" 2>&1 || true
}

# acked_in_order LOG PATTERN...: each pattern appears in an "acknowledged to keyd" line after
# the previous one.
acked_in_order() {
    local log=$1 line=0 pattern found
    shift
    for pattern in "$@"; do
        found=$(sed 's/\x1b\[[0-9;]*m//g' "$log" | grep -nF 'acknowledged to keyd' | grep -F -- "$pattern" |
            awk -F: -v after="$line" '$1 > after { print $1; exit }')
        [ -n "$found" ] || return 1
        line=$found
    done
}

wireguard_phase() {
    log "WireGuard: start node-shim on both nodes"
    node_config node-a 192.168.100.1 10.1.0.0/24 wireguard 9101
    node_config node-b 192.168.100.2 10.2.0.0/24 wireguard 9102
    start_shim node-a wireguard
    start_shim node-b wireguard
    for n in node-a node-b; do
        wait_for 60 "$n ready with its peer" status_has "$n" '"peers":1,'
        wait_for 30 "$n acked epoch 1" status_has "$n" '"wireguard_epoch":1'
    done
    status_has node-a '"wireguard_impl":"kernel"' || fail "kernel WireGuard not used"
    ns node-a wg show keyd-wg0 > "$LOGS/wg-a.txt"
    grep -q 'listening port: 51871' "$LOGS/wg-a.txt" || fail "listen port"
    grep -q 'preshared key: (hidden)' "$LOGS/wg-a.txt" || fail "no preshared key on the peer"
    if ! ns pod-a ping -c 3 -W 2 10.2.0.2 > "$LOGS/wg-ping.txt"; then
        wg_diagnostics
        fail "WireGuard: pod-a cannot reach pod-b"
    fi
    result wg_pod_to_pod ok

    log "WireGuard: stream, capture, a preshared-key epoch, three node-key epochs"
    start_capture wg
    start_stream wg
    start_probe wg-rotation
    sleep 3
    # New preshared keys: updated in place, used from the next handshake.
    keyctl rotate wireguard-psk > "$LOGS/keyctl-wg.log"
    for n in node-a node-b; do
        wait_for 30 "$n acked preshared-key epoch 2" status_has "$n" '"wireguard_epoch":2'
    done
    result wg_psk_epoch_acked 2
    sleep 2
    local first_a="" first_b="" round
    for round in 1 2 3; do
        OLD_A=$(ns node-a wg show keyd-wg0 public-key)
        OLD_B=$(ns node-b wg show keyd-wg0 public-key)
        [ -n "$first_a" ] || { first_a=$OLD_A; first_b=$OLD_B; }
        # keyd asks every node for a new keypair (a node-key epoch).
        keyctl rotate wireguard-node-keys >> "$LOGS/keyctl-wg.log"
        wait_for 30 "both nodes to rotate and learn each other's new key (epoch $round)" wg_rotated
        sleep 2
    done
    local old=$first_a
    stop_probe wg-rotation
    stop_stream wg
    stop_capture
    check_capture wg 'UDP'
    if [ "$(grep ' IP ' "$OUT/wg.txt" | grep -cv '\.51871 > ' || true)" -ne 0 ]; then
        fail "WireGuard capture has UDP not on port 51871"
    fi
    [ "$(ns node-a wg show keyd-wg0 public-key)" != "$old" ] || fail "node-a's public key did not change"
    local dump_a dump_b
    dump_a=$(ns node-a wg show keyd-wg0 dump)
    dump_b=$(ns node-b wg show keyd-wg0 dump)
    for k in "$first_a" "$first_b" "$OLD_A" "$OLD_B"; do
        [[ $dump_a != *"$k"* ]] || fail "an old public key is still on node-a"
        [[ $dump_b != *"$k"* ]] || fail "an old public key is still on node-b"
    done
    result wg_old_public_key_gone yes
    result wg_rotation_stream_survived yes

    log "WireGuard: restart adopts the kernel state"
    local key_before
    key_before=$(ns node-a wg show keyd-wg0 public-key)
    start_probe wg-restart
    stop_shim node-a
    sleep 1
    start_shim node-a wireguard
    wait_for 60 "node-a ready after restart" status_has node-a '"ready":true'
    sleep 2
    stop_probe wg-restart
    [ "$(ns node-a wg show keyd-wg0 public-key)" = "$key_before" ] || fail "restart changed the public key"
    status_has node-a '"wireguard_private_key":true' || fail "private key not adopted"
    no_kernel_ops node-a || fail "restart changed the kernel: $(metrics_of node-a | grep kernel_ops)"
    result wg_restart_kernel_ops 0

    stop_shim node-a
    stop_shim node-b
    ns node-a ip link del keyd-wg0
    ns node-b ip link del keyd-wg0
}

ipsec_phase() {
    log "IPsec: CNI routes, first key, node-shim on both nodes"
    ns node-a ip route add 10.2.0.0/24 via 192.168.100.2
    ns node-b ip route add 10.1.0.0/24 via 192.168.100.1
    keyctl ipsec rotate > "$LOGS/keyctl.log"
    # Rollouts retire the old key after the overlap (5 minutes by default).
    keyctl schedule set ipsec --overlap 3s >> "$LOGS/keyctl.log"
    node_config node-a 192.168.100.1 10.1.0.0/24 ipsec 9101
    node_config node-b 192.168.100.2 10.2.0.0/24 ipsec 9102
    start_shim node-a ipsec
    start_shim node-b ipsec
    for n in node-a node-b; do
        wait_for 60 "$n programmed key 1" status_has "$n" '"ipsec_spis":[1],"ipsec_outbound_spi":1'
    done
    ns node-a ip xfrm state > "$LOGS/xfrm-state-a.txt"
    grep -q 'rfc4106(gcm(aes))' "$LOGS/xfrm-state-a.txt" || fail "no AEAD state"
    grep -q 'flag esn' "$LOGS/xfrm-state-a.txt" || grep -q 'esn' "$LOGS/xfrm-state-a.txt" || fail "ESN not set"
    grep -q 'replay-window 1024\|window 1024' "$LOGS/xfrm-state-a.txt" || fail "replay window not 1024: $(head -20 "$LOGS/xfrm-state-a.txt")"
    ns node-a ip xfrm policy > "$LOGS/xfrm-policy-a.txt"
    for d in in out fwd; do grep -q "dir $d" "$LOGS/xfrm-policy-a.txt" || fail "no $d policy"; done
    ns pod-a ping -c 3 -W 2 10.2.0.2 > "$LOGS/esp-ping.txt" || fail "IPsec: pod-a cannot reach pod-b"
    result esp_pod_to_pod ok

    log "IPsec: stream, capture, a rollout (staged, active, retired)"
    start_capture esp
    start_stream esp
    start_probe esp-rotation
    sleep 3
    keyctl ipsec rotate >> "$LOGS/keyctl.log"
    # The whole rollout can take only seconds: wait for its end, then check from each node's log
    # that every step was acknowledged, in order.
    for n in node-a node-b; do
        wait_for 90 "$n with key 2 outbound and key 1 retired" status_has "$n" '"ipsec_spis":[2],"ipsec_outbound_spi":2'
    done
    keyctl ipsec show >> "$LOGS/keyctl.log"
    for n in node-a node-b; do
        acked_in_order "$LOGS/$n-ipsec.log" \
            'ipsec_spis=[1, 2] ipsec_outbound_spi=Some(1)' \
            'ipsec_spis=[1, 2] ipsec_outbound_spi=Some(2)' \
            'ipsec_spis=[2] ipsec_outbound_spi=Some(2)' ||
            fail "$n did not acknowledge staged, active and retired in order"
    done
    result esp_rollout_steps_acked "staged,active,retired"
    sleep 3
    stop_probe esp-rotation
    stop_stream esp
    stop_capture
    check_capture esp 'ESP(spi='
    for n in node-a node-b; do
        local states
        states=$(ns "$n" ip xfrm state)
        [[ $states != *"spi 0x00000001 "* ]] || fail "$n still has SPI 1"
    done
    grep -q 'ESP(spi=0x00000001' "$OUT/esp.txt" || fail "no ESP with SPI 1 seen before the rotation"
    grep -q 'ESP(spi=0x00000002' "$OUT/esp.txt" || fail "no ESP with SPI 2 seen after the rotation"
    result esp_old_spi_gone yes
    result esp_rotation_stream_survived yes
    keyctl nodes > "$LOGS/keyctl-nodes.txt" 2>&1 || true

    log "IPsec: restart adopts the kernel state"
    start_probe esp-restart
    stop_shim node-a
    sleep 1
    start_shim node-a ipsec
    wait_for 60 "node-a ready after restart" status_has node-a '"ready":true'
    sleep 2
    stop_probe esp-restart
    status_has node-a '"xfrm_states":2' || fail "adopted state count: $(status_of node-a)"
    no_kernel_ops node-a || fail "restart changed the kernel: $(metrics_of node-a | grep kernel_ops)"
    result esp_restart_kernel_ops 0

    # keyd goes away: the nodes say so, keep every state and keep encrypting; when keyd is back
    # they reach it again without touching the kernel.
    log "IPsec: keyd away keeps the kernel state"
    local n states_before=()
    for n in node-a node-b; do
        states_before+=("$(ns "$n" ip xfrm state | grep -c '^src' || true)")
    done
    start_probe esp-keyd-away
    kill -TERM "$KEYD_PID" 2>/dev/null || true
    wait "$KEYD_PID" 2>/dev/null || true
    for n in node-a node-b; do
        wait_for 30 "$n to notice that keyd is away" status_has "$n" '"reachable":false'
    done
    sleep 5
    local i=0
    for n in node-a node-b; do
        [ "$(ns "$n" ip xfrm state | grep -c '^src' || true)" = "${states_before[$i]}" ] ||
            fail "$n's XFRM states changed while keyd was away"
        i=$((i + 1))
    done
    ns pod-a ping -c 3 -W 2 10.2.0.2 > "$LOGS/esp-keyd-away-ping.txt" || fail "pod-a cannot reach pod-b while keyd is away"
    run_keyd
    for n in node-a node-b; do
        wait_for 60 "$n to reach keyd again" status_has "$n" '"reachable":true'
    done
    sleep 2
    stop_probe esp-keyd-away
    [ "$(grep -F 'esp-keyd-away_max_lost_pings=' "$RES" | cut -d= -f2)" -le 2 ] ||
        fail "traffic stopped while keyd was away (see $OUT/esp-keyd-away-ping.txt)"
    result esp_keyd_away_states_kept yes
    stop_shim node-a
    stop_shim node-b
}

bench() {
    log "benchmark: 1,000 peers, node-shim vs ip -batch / tc -batch / wg setconf"
    "$BIN/node-shim-bench" --peers 1000 --work /tmp/bench --out "$OUT/bench.txt" > "$LOGS/bench.log" 2>&1 ||
        fail "benchmark: $(tail -n 20 "$LOGS/bench.log")"
    cat "$OUT/bench.txt" >> "$RES"
}

for w in $WHAT; do
    case $w in
    e2e)
        topology
        start_keyd
        wireguard_phase
        ipsec_phase
        kill "$KEYD_PID" 2>/dev/null || true
        ;;
    bench) bench ;;
    esac
done
echo "VM-E2E: PASS" >> "$RES"
log "all passed"

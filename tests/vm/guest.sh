#!/bin/bash
# Runs inside the virtme-ng guest (Debian's kernel, which has WireGuard and ESP), as root:
#   KUBE_CLUSTER=PATH guest.sh BIN_DIR OUT_DIR [e2e] [policy] [bench]
# BIN_DIR holds keyd, keyctl, node-shim and node-shim-bench (release builds from the host's
# target directory, which the guest sees). OUT_DIR is writable and shared with the host.
# KUBE_CLUSTER is keyd-tests' kube-cluster binary (etcd and kube-apiserver for the policy phase).
#
# End to end: keyd in the root namespace; two "nodes" (network namespaces node-a, node-b)
# joined by an underlay veth, each with a "pod" namespace behind it, each running node-shim.
# For WireGuard, then IPsec: pod-to-pod traffic works; a capture on the underlay shows only
# WireGuard UDP / ESP and never the plaintext marker; a TCP stream survives a key rotation
# without a reset; after the rotation the old public key / old SPI is gone from the kernel; and
# a node-shim restart adopts the kernel's state without changing it. Then policy mode: keyd
# compiles EncryptionPolicies from a kube-apiserver in the guest and node-shim's eBPF program
# encrypts only the covered flows (WireGuard with IPv4 and IPv6, then IPsec), counts them
# exactly, and drops them when the tunnel breaks (see policy_setup).
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
    # A node-shim frozen by the test would not answer the diagnostics.
    local pid
    for pid in "${SHIM_PID[@]}"; do kill -CONT "$pid" 2>/dev/null || true; done
    diagnostics > "$LOGS/diagnostics.txt" 2>&1 || true
    for f in "$LOGS"/*.log; do
        echo "----- $f (tail)"
        tail -n 30 "$f" || true
    done
    exit 1
}
# What both nodes hold, for a failure (never key material: wg show hides private and preshared
# keys unless asked for them).
diagnostics() {
    local n
    for n in node-a node-b; do
        echo "===== $n"
        ns "$n" ip rule show
        ns "$n" ip route show table all | grep -v '^local\|^broadcast\|^multicast\|^fe80\|ff00::/8'
        ns "$n" wg show all 2>/dev/null
        ns "$n" ip xfrm policy
        ns "$n" ip -s xfrm state | grep -v 'enc \|aead \|auth' || true
        ns "$n" tc filter show dev pod ingress 2>/dev/null
        ns "$n" nstat -az 2>/dev/null | grep -iE 'drop|xfrm|retrans|filter|noroute|discard' | grep -v ' 0 ' || true
        ns "$n" curl -sf --max-time 5 "http://127.0.0.1:$(port_of "$n")/status" && echo
    done
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

# node_config NODE IP CIDRS MODE PORT [TAG]: writes /tmp/NODE-TAG.toml (TAG: MODE by default);
# CIDRS is comma-separated.
node_config() {
    local node=$1 ip=$2 mode=$4 port=$5 tag=${6:-$4} cidrs
    cidrs=\"${3//,/\", \"}\"
    cat > "/tmp/$node-$tag.toml" <<EOF
node_name = "$node"
endpoint = "$ip"
pod_cidrs = [$cidrs]
mode = "$mode"
poll_interval = "1s"
resync_interval = "2s"
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
# start_shim NODE TAG: node-shim with /tmp/NODE-TAG.toml, logging to NODE-TAG.log.
start_shim() {
    local node=$1 mode=$2
    # Not through the `ns` function: a function in the background runs in a subshell, and the
    # signals below must reach node-shim itself (`ip netns exec` execs it in place).
    ip netns exec "$node" "$BIN/node-shim" --config "/tmp/$node-$mode.toml" >> "$LOGS/$node-$mode.log" 2>&1 &
    SHIM_PID[$node]=$!
}
stop_shim() {
    local pid=${SHIM_PID[$1]:-}
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
port_of() { [ "$1" = node-a ] && echo 9101 || echo 9102; }
status_of() { ns "$1" curl -sf --max-time 5 "http://127.0.0.1:$(port_of "$1")/status"; }
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
metrics_of() { ns "$1" curl -sf --max-time 5 "http://127.0.0.1:$(port_of "$1")/metrics"; }

# A TCP stream pod-a -> pod-b carrying the marker ten times a second until $OUT/stream.on goes.
start_stream() { start_flow "$1" 10.2.0.2 7000 KEYD-PLAINTEXT-MARKER; }
stop_stream() { stop_flow "$1"; }

# start_flow TAG DST PORT MARKER: a TCP stream from pod-a to DST:PORT (an IPv4 or IPv6 address
# of pod-b) carrying "MARKER i" ten times a second until stop_flow TAG.
declare -A FLOW_SERVER FLOW_CLIENT
start_flow() {
    local tag=$1 dst=$2 port=$3 marker=$4 listen connect
    if [[ $dst == *:* ]]; then
        listen="TCP6-LISTEN:$port,ipv6only=1,reuseaddr" connect="TCP6:[$dst]:$port,connect-timeout=5"
    else
        listen="TCP4-LISTEN:$port,reuseaddr" connect="TCP4:$dst:$port,connect-timeout=5"
    fi
    rm -f "$OUT/$tag-recv.txt"
    ip netns exec pod-b socat -u "$listen" "OPEN:$OUT/$tag-recv.txt,creat,trunc" \
        > "$LOGS/$tag-server.log" 2>&1 &
    FLOW_SERVER[$tag]=$!
    sleep 0.5
    touch "$OUT/$tag.on"
    (
        i=0
        while [ -e "$OUT/$tag.on" ]; do
            echo "$marker $i"
            i=$((i + 1))
            sleep 0.1
        done
    ) | ip netns exec pod-a socat -u - "$connect" > "$LOGS/$tag-client.log" 2>&1 &
    FLOW_CLIENT[$tag]=$!
}
# stop_flow TAG: the stream was never reset and every line arrived, in order.
stop_flow() {
    local tag=$1
    # A slow VM (no KVM, a busy host) sends fewer lines in the same time: let the stream reach
    # the length the check below asks for (bounded) before ending it.
    local enough=$((SECONDS + 30))
    while (($(wc -l < "$OUT/$tag-recv.txt" 2>/dev/null || echo 0) <= 20)) && ((SECONDS < enough)); do
        sleep 0.2
    done
    rm -f "$OUT/$tag.on"
    local rc=0 server=${FLOW_SERVER[$tag]} deadline=$((SECONDS + 10))
    wait "${FLOW_CLIENT[$tag]}" || rc=$?
    [ "$rc" -eq 0 ] || {
        kill "$server" 2>/dev/null || true
        fail "$tag: the TCP stream broke (client exit $rc): $(cat "$LOGS/$tag-client.log")"
    }
    # The server ends when the client's end of stream arrives.
    while kill -0 "$server" 2>/dev/null; do
        if ((SECONDS >= deadline)); then
            kill "$server" 2>/dev/null || true
            fail "$tag: the end of the stream never reached the server"
        fi
        sleep 0.2
    done
    wait "$server" || true
    local lines last
    lines=$(wc -l < "$OUT/$tag-recv.txt")
    last=$(tail -n 1 "$OUT/$tag-recv.txt" | awk '{print $2}')
    [ "$lines" -gt 20 ] && [ "$last" -eq $((lines - 1)) ] ||
        fail "$tag: stream incomplete ($lines lines, last $last)"
    result "${tag}_stream_lines" "$lines"
}

# Background processes are started with `ip netns exec` directly (it execs in place), never
# through the `ns` function: a function in the background is a subshell, which is what a signal
# would reach, and background jobs of a script ignore SIGINT.
declare -A CAPTURES
# start_capture TAG [NETNS DEVICE FILTER...]: by default the link between the nodes (the wire's
# bridge, which sees exactly the frames on it).
start_capture() {
    local tag=$1 netns=${2:-wire} dev=${3:-br0}
    shift $(($# < 3 ? $# : 3))
    ip netns exec "$netns" tcpdump --immediate-mode -U -n -s 0 -i "$dev" -w "$OUT/$tag.pcap" "$@" \
        > "$LOGS/$tag-tcpdump.log" 2>&1 &
    CAPTURES[$tag]=$!
    sleep 1
}
# stop_capture [TAG...]: by default every capture running.
stop_capture() {
    local tag pid tags=("$@")
    [ "${#tags[@]}" -gt 0 ] || tags=("${!CAPTURES[@]}")
    sleep 0.5
    for tag in "${tags[@]}"; do
        pid=${CAPTURES[$tag]}
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        unset "CAPTURES[$tag]"
    done
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

# --- policy mode: EncryptionPolicies from a real kube-apiserver ----------------------------------
# etcd and kube-apiserver run in the guest (tests/src/bin/kube-cluster.rs, started at boot since
# they take minutes to start under emulation); keyd watches them and compiles each node's rules;
# node-shim steers with its eBPF program. Pod "api" (pod-a, on node-a) and pod "db" (pod-b, on
# node-b), IPv4 and IPv6; a policy covers TCP 5432 between them. Flows carry markers:
# KEYD-COVERED-* (port 5432, covered) and KEYD-UNCOVERED (port 8080, uncovered).

KUBE_DIR=/tmp/kube
start_kube() {
    "$KUBE_CLUSTER" "$KUBE_DIR" > "$LOGS/kube-cluster.log" 2>&1 &
    KUBE_PID=$!
}
# kapi METHOD PATH [JSON [CONTENT-TYPE]]: one request to the API server as its admin.
kapi() {
    local method=$1 path=$2 body=${3:-} ctype=${4:-application/json}
    local args=(-sS --fail-with-body --cacert "$KUBE_DIR/apiserver-ca.pem"
        -H "Authorization: Bearer $(cat "$KUBE_DIR/token")" -X "$method")
    [ -z "$body" ] || args+=(-H "Content-Type: $ctype" --data-binary "$body")
    echo "== $method $path" >> "$LOGS/kapi.log"
    curl "${args[@]}" "$(cat "$KUBE_DIR/url")$path" >> "$LOGS/kapi.log" 2>&1 ||
        fail "kube-apiserver refused $method $path: $(tail -c 600 "$LOGS/kapi.log")"
    echo >> "$LOGS/kapi.log"
}
# kube_pod NAME APP NODE IP...: a running pod in namespace shop (no kubelet here: the status is
# written directly, as a kubelet would).
kube_pod() {
    local name=$1 app=$2 node=$3 ips="" ip
    shift 3
    for ip in "$@"; do ips+="${ips:+,}{\"ip\":\"$ip\"}"; done
    kapi POST /api/v1/namespaces/shop/pods \
        "{\"apiVersion\":\"v1\",\"kind\":\"Pod\",\"metadata\":{\"name\":\"$name\",\"labels\":{\"app\":\"$app\"}},\"spec\":{\"nodeName\":\"$node\",\"containers\":[{\"name\":\"c\",\"image\":\"example\"}]}}"
    kapi PATCH "/api/v1/namespaces/shop/pods/$name/status" \
        "{\"status\":{\"phase\":\"Running\",\"podIP\":\"$1\",\"podIPs\":[$ips]}}" application/merge-patch+json
}
POLICIES=/apis/keyd.io/v1alpha1/namespaces/shop/encryptionpolicies
# db_policy NAME MODE: app=db pods on TCP 5432 with app=api pods as peers; strict (the default).
db_policy() {
    kapi POST "$POLICIES" \
        "{\"apiVersion\":\"keyd.io/v1alpha1\",\"kind\":\"EncryptionPolicy\",\"metadata\":{\"name\":\"$1\"},\"spec\":{\"podSelector\":{\"matchLabels\":{\"app\":\"db\"}},\"mode\":\"$2\",\"ports\":[{\"port\":5432,\"protocol\":\"TCP\"}],\"peers\":[{\"podSelector\":{\"matchLabels\":{\"app\":\"api\"}}}]}}"
}

# steering_config NODE TAG ENCRYPT: adds [steering] to /tmp/NODE-TAG.toml.
steering_config() {
    printf '[steering]\nencrypt = "%s"\ndevices = ["pod"]\npin_dir = ""\nreport_interval = "2s"\n' "$3" \
        >> "/tmp/$1-$2.toml"
}

# counter NODE POLICY OUTCOME: node-shim's packet counter (0 when not exported yet).
counter() {
    local m v
    m=$(metrics_of "$1") || m=""
    v=$(grep -F "node_shim_policy_packets_total{policy=\"$2\",outcome=\"$3\"}" <<< "$m" | awk '{print $NF}') || true
    echo "${v:-0}"
}
counter_at_least() { [ "$(counter "$1" "$2" "$3")" -ge "$4" ]; }
# expect_counter NODE POLICY OUTCOME WANT: the counter reaches WANT (it is exported every
# second) and stays exactly there.
expect_counter() {
    local deadline=$((SECONDS + 15))
    until counter_at_least "$@"; do
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    sleep 1.5
    local got
    got=$(counter "$1" "$2" "$3")
    [ "$got" -eq "$4" ] || fail "$1's $3 counter of $2 is $got, but the test sent $4 such packets"
}
# packets TAG: how many packets the capture TAG holds.
packets() { { tcpdump -n -r "$OUT/$1.pcap" 2>/dev/null || true; } | wc -l; }

# check_wire TAG TUNNEL UNCOVERED: on the link between the nodes, no covered marker and no TCP
# 5432 packet; TUNNEL (a string of tcpdump's text, or of the packets' bytes) is there; the
# uncovered flow's marker is there (UNCOVERED=clear: policy mode is selective) or not
# (UNCOVERED=encrypted: all mode, where every IP packet on the link is the tunnel's).
check_wire() {
    local tag=$1 tunnel=$2 uncovered=$3
    tcpdump -n -r "$OUT/$tag.pcap" 2>/dev/null > "$OUT/$tag.txt"
    if grep -qa KEYD-COVERED "$OUT/$tag.pcap"; then fail "$tag: a covered flow's marker on the link"; fi
    if grep -E '\.5432[: ]' "$OUT/$tag.txt" > "$LOGS/$tag-5432.txt"; then
        fail "$tag: covered TCP 5432 in the clear on the link: $(head -3 "$LOGS/$tag-5432.txt")"
    fi
    grep -qF -- "$tunnel" "$OUT/$tag.txt" || grep -qaF -- "$tunnel" "$OUT/$tag.pcap" ||
        fail "$tag: no $tunnel on the link"
    case $uncovered in
    clear)
        grep -qa KEYD-UNCOVERED "$OUT/$tag.pcap" ||
            fail "$tag: the uncovered flow is not in the clear: policy mode encrypted more than its policies"
        ;;
    encrypted)
        if grep -qa KEYD-UNCOVERED "$OUT/$tag.pcap"; then fail "$tag: all mode sent the uncovered flow in the clear"; fi
        local other
        # (IPv6 neighbour discovery between the nodes' own addresses is not pod traffic.)
        other=$(grep -E ' IP6? ' "$OUT/$tag.txt" | grep -vE 'ICMP6, (neighbor|router|multicast)' |
            grep -cvF -- "$tunnel" || true)
        [ "$other" -eq 0 ] || fail "$tag: $other packet(s) on the link are not $tunnel"
        ;;
    esac
    result "${tag}_link_packets" "$(grep -cE ' IP6? ' "$OUT/$tag.txt" || true)"
}

# covered_attempts TAG N DST...: N connection attempts to each DST on 5432, each a single SYN
# (the connect timeout is below TCP's first retransmission at 1 s); none may succeed.
covered_attempts() {
    local tag=$1 n=$2 i dst
    shift 2
    for dst in "$@"; do
        for ((i = 0; i < n; i++)); do
            if ns pod-a socat -u /dev/null "TCP:$dst:5432,connect-timeout=0.5" 2>/dev/null; then
                fail "$tag: a covered connection to $dst succeeded without a tunnel"
            fi
        done
    done
}

# report_shows POLICY: keyctl report lists the policy as programmed on both nodes, with packets.
report_shows() {
    local out line
    out=$(keyctl report 2>&1) || true
    echo "$out" > "$LOGS/keyctl-report.txt"
    line=$(grep -F "$1" <<< "$out") || return 1
    [[ $line =~ [[:space:]]2/2[[:space:]]+[1-9] ]]
}

# cni_routes add|del: the cluster network's own path between the nodes, in the clear.
cni_routes() {
    ns node-a ip route "$1" 10.2.0.0/24 via 192.168.100.2
    ns node-b ip route "$1" 10.1.0.0/24 via 192.168.100.1
    ns node-a ip -6 route "$1" fd00:b::/64 via fd00:ff::2
    ns node-b ip -6 route "$1" fd00:a::/64 via fd00:ff::1
}

# outbound_spi NODE: the SPI node-shim sends with (empty if none).
outbound_spi() {
    local s
    s=$(status_of "$1") || return 1
    s=$(grep -o '"ipsec_outbound_spi":[0-9]*' <<< "$s") || return 1
    echo "${s#*:}"
}
has_outbound_spi() {
    local spi
    spi=$(outbound_spi "$1") && [ -n "$spi" ]
}
outbound_spi_is_not() {
    local now
    now=$(outbound_spi "$1") && [ -n "$now" ] && [ "$now" != "$2" ]
}
# kube_up: kube-cluster is ready; fails the test at once if it exited.
kube_up() {
    [ -s "$KUBE_DIR/url" ] && return 0
    kill -0 "$KUBE_PID" 2>/dev/null || fail "kube-cluster exited: $(tail -n 5 "$LOGS/kube-cluster.log")"
    return 1
}
xfrm_has_policies() {
    local p
    p=$(ns "$1" ip xfrm policy) && [[ $p == *"dir out"* ]]
}

# start_shims MODE TAG [ENCRYPT [CIDRS_A CIDRS_B]]: (re)starts both node-shims in MODE from
# /tmp/NODE-TAG.toml, with [steering] in ENCRYPT mode if given (pod CIDRs: IPv4 by default), and
# waits until each has its tunnel to the other and, in policy mode, its rules.
start_shims() {
    local mode=$1 tag=$2 encrypt=${3:-} n
    stop_shim node-a
    stop_shim node-b
    node_config node-a 192.168.100.1 "${4:-10.1.0.0/24}" "$mode" 9101 "$tag"
    node_config node-b 192.168.100.2 "${5:-10.2.0.0/24}" "$mode" 9102 "$tag"
    for n in node-a node-b; do
        [ -z "$encrypt" ] || steering_config "$n" "$tag" "$encrypt"
        start_shim "$n" "$tag"
    done
    for n in node-a node-b; do
        if [ "$mode" = wireguard ]; then
            wait_for 60 "$n ready with its WireGuard peer ($tag)" status_has "$n" '"peers":1,'
        else
            wait_for 60 "$n sending with a key ($tag)" has_outbound_spi "$n"
        fi
        [ "$encrypt" != policy ] || wait_for 30 "$n programmed its rules ($tag)" status_has "$n" '"programmed":true'
    done
    sleep 1
}

policy_setup() {
    log "policy: kube-apiserver and etcd in the guest; keyd watches them"
    wait_for 480 "kube-apiserver and etcd in the guest (see logs/kube-cluster.log)" kube_up
    local n sub
    # The earlier phases' XFRM policies would encrypt everything: policy mode starts clean.
    for n in node-a node-b; do
        ns "$n" ip xfrm state flush
        ns "$n" ip xfrm policy flush
        ns "$n" sysctl -qw net.ipv6.conf.all.forwarding=1
    done
    # IPv6 beside IPv4, and the cluster network's clear path for both.
    ns node-a ip -6 addr add fd00:ff::1/64 dev ul nodad
    ns node-b ip -6 addr add fd00:ff::2/64 dev ul nodad
    for sub in a b; do
        ns "node-$sub" ip -6 addr add "fd00:$sub::1/64" dev pod nodad
        ns "pod-$sub" ip -6 addr add "fd00:$sub::2/64" dev eth0 nodad
        ns "pod-$sub" ip -6 route add default via "fd00:$sub::1"
    done
    ns node-a ip route del 10.2.0.0/24 2>/dev/null || true
    ns node-b ip route del 10.1.0.0/24 2>/dev/null || true
    cni_routes add
    ns pod-a ping -c 1 -W 5 10.2.0.2 > /dev/null || fail "pod-a cannot reach pod-b over IPv4 in the clear"
    ns pod-a ping -6 -c 1 -W 5 fd00:b::2 > /dev/null || fail "pod-a cannot reach pod-b over IPv6 in the clear"

    # keyd again, now with [policy] pointing at the API server.
    kill -TERM "$KEYD_PID" 2>/dev/null || true
    wait "$KEYD_PID" 2>/dev/null || true
    {
        cat "$KEYD_DIR/keyd.toml"
        printf '\n[policy]\nkube_api = "%s"\nkube_ca = "%s"\nkube_token_file = "%s"\n' \
            "$(cat "$KUBE_DIR/url")" "$KUBE_DIR/apiserver-ca.pem" "$KUBE_DIR/token"
    } > "$KEYD_DIR/keyd-policy.toml"
    "$BIN/keyd" serve --config "$KEYD_DIR/keyd-policy.toml" >> "$LOGS/keyd.log" 2>&1 &
    KEYD_PID=$!
    wait_for 60 "keyd ready with [policy]" curl -sf http://127.0.0.1:9443/readyz

    kapi POST /api/v1/namespaces '{"apiVersion":"v1","kind":"Namespace","metadata":{"name":"shop"}}'
    kube_pod api api node-a 10.1.0.2 fd00:a::2
    kube_pod db db node-b 10.2.0.2 fd00:b::2
    POLICY_READY=1
}

policy_wireguard_phase() {
    local p="EncryptionPolicy shop/db-wireguard" n
    db_policy db-wireguard wireguard
    start_shims wireguard wg-policy policy 10.1.0.0/24,fd00:a::/64 10.2.0.0/24,fd00:b::/64
    for n in node-a node-b; do
        wait_for 30 "$n programmed $p" status_has "$n" "\"name\":\"$p\",\"programmed\":true"
    done

    log "policy (WireGuard): covered flows (IPv4, IPv6) only inside WireGuard, the uncovered one in the clear"
    local enc0 drop0 sent
    enc0=$(counter node-a "$p" encrypted)
    drop0=$(counter node-a "$p" dropped)
    start_capture wg-policy
    start_capture wg-policy-sent node-a pod -Q in tcp dst port 5432
    start_flow wg-covered4 10.2.0.2 5432 KEYD-COVERED-V4
    start_flow wg-covered6 fd00:b::2 5432 KEYD-COVERED-V6
    start_flow wg-uncovered 10.2.0.2 8080 KEYD-UNCOVERED
    sleep 6
    stop_flow wg-covered4
    stop_flow wg-covered6
    stop_flow wg-uncovered
    stop_capture wg-policy wg-policy-sent
    check_wire wg-policy '.51871 > ' clear
    sent=$(packets wg-policy-sent)
    [ "$sent" -gt 40 ] || fail "too few covered packets captured leaving pod-a ($sent)"
    expect_counter node-a "$p" encrypted $((enc0 + sent))
    [ "$(counter node-a "$p" dropped)" -eq "$drop0" ] || fail "covered packets dropped while the tunnel was up"
    result policy_wg_covered_packets_sent "$sent"
    result policy_wg_counter_matches yes
    wait_for 30 "keyctl report to show $p programmed on both nodes" report_shows "$p"
    cp "$LOGS/keyctl-report.txt" "$OUT/policy-report.txt"
    result policy_wg_report "$(grep -F "$p" "$OUT/policy-report.txt" | tr -s ' ')"

    log "policy (WireGuard): node-b leaves WireGuard; node-a drops covered traffic, uncovered flows on"
    start_flow wg-break-uncovered 10.2.0.2 8080 KEYD-UNCOVERED
    stop_shim node-b
    node_config node-b 192.168.100.2 10.2.0.0/24 ipsec 9102 ipsec-policy
    steering_config node-b ipsec-policy policy
    start_shim node-b ipsec-policy
    wait_for 60 "node-a to remove node-b as a WireGuard peer" status_has node-a '"peers":0,'
    sleep 1
    drop0=$(counter node-a "$p" dropped)
    start_capture wg-break
    start_capture wg-break-sent node-a pod -Q in tcp dst port 5432
    covered_attempts wg-break 5 10.2.0.2 '[fd00:b::2]'
    sleep 1
    stop_capture wg-break wg-break-sent
    stop_flow wg-break-uncovered
    check_wire wg-break KEYD-UNCOVERED clear
    sent=$(packets wg-break-sent)
    [ "$sent" -ge 10 ] || fail "wg-break: fewer SYNs captured ($sent) than attempts made (10)"
    expect_counter node-a "$p" dropped $((drop0 + sent))
    result policy_wg_break_dropped "$sent"

    log "policy (WireGuard): all mode encrypts the uncovered flow too"
    stop_shim node-a
    stop_shim node-b
    # All mode routes every peer CIDR through the device; the cluster network's routes would
    # compete with those.
    cni_routes del
    start_shims wireguard wg-all all 10.1.0.0/24,fd00:a::/64 10.2.0.0/24,fd00:b::/64
    enc0=$(counter node-a all encrypted)
    start_capture wg-all
    start_flow wg-all-covered 10.2.0.2 5432 KEYD-COVERED-V4
    start_flow wg-all-uncovered6 fd00:b::2 8080 KEYD-UNCOVERED
    sleep 6
    stop_flow wg-all-covered
    stop_flow wg-all-uncovered6
    stop_capture wg-all
    check_wire wg-all '.51871 > ' encrypted
    counter_at_least node-a all encrypted $((enc0 + 40)) ||
        fail "all mode: node-a counted $(counter node-a all encrypted) packets (from $enc0)"
    result policy_wg_all_mode_encrypted yes
    stop_shim node-a
    stop_shim node-b
    for n in node-a node-b; do ns "$n" ip link del keyd-wg0; done
    cni_routes add
    kapi DELETE "$POLICIES/db-wireguard"
}

policy_ipsec_phase() {
    local p="EncryptionPolicy shop/db-ipsec" n
    db_policy db-ipsec ipsec
    for n in node-a node-b; do
        ns "$n" ip xfrm state flush
        ns "$n" ip xfrm policy flush
    done
    start_shims ipsec ipsec-policy policy
    for n in node-a node-b; do
        wait_for 30 "$n programmed $p" status_has "$n" "\"name\":\"$p\",\"programmed\":true"
    done
    sleep 1
    ns node-a ip xfrm policy > "$LOGS/xfrm-policy-policy-mode-a.txt"
    grep -q 'mark 0x20/0xf0' "$LOGS/xfrm-policy-policy-mode-a.txt" ||
        fail "node-a's out policies do not match the steering mark: $(head -20 "$LOGS/xfrm-policy-policy-mode-a.txt")"

    log "policy (IPsec): the covered flow only as ESP, the uncovered one in the clear"
    local enc0 drop0 sent
    enc0=$(counter node-a "$p" encrypted)
    start_capture esp-policy
    start_capture esp-policy-sent node-a pod -Q in tcp dst port 5432
    start_flow esp-covered 10.2.0.2 5432 KEYD-COVERED-V4
    start_flow esp-uncovered 10.2.0.2 8080 KEYD-UNCOVERED
    sleep 6
    stop_flow esp-covered
    stop_flow esp-uncovered
    stop_capture esp-policy esp-policy-sent
    check_wire esp-policy 'ESP(spi=' clear
    sent=$(packets esp-policy-sent)
    [ "$sent" -gt 20 ] || fail "too few covered packets captured leaving pod-a ($sent)"
    expect_counter node-a "$p" encrypted $((enc0 + sent))
    result policy_esp_covered_packets_sent "$sent"
    wait_for 30 "keyctl report to show $p programmed on both nodes" report_shows "$p"
    result policy_esp_report "$(grep -F "$p" "$LOGS/keyctl-report.txt" | tr -s ' ')"

    # node-shim frozen (hung, or stopped by a debugger) while the XFRM states and policies are
    # flushed: the maps still say the tunnel is ready, so covered packets are marked, match no
    # XFRM policy and are routed to the underlay in the clear, where the guard drops them.
    log "policy (IPsec): XFRM flushed under a frozen node-shim; the guard drops covered traffic"
    start_flow esp-break-uncovered 10.2.0.2 8080 KEYD-UNCOVERED
    sleep 1
    drop0=$(counter node-a "$p" dropped)
    enc0=$(counter node-a "$p" encrypted)
    kill -STOP "${SHIM_PID[node-a]}"
    ns node-a ip xfrm state flush
    ns node-a ip xfrm policy flush
    start_capture esp-break
    start_capture esp-break-sent node-a pod -Q in tcp dst port 5432
    covered_attempts esp-break 5 10.2.0.2
    sleep 1
    stop_capture esp-break esp-break-sent
    kill -CONT "${SHIM_PID[node-a]}"
    sleep 1
    stop_flow esp-break-uncovered
    check_wire esp-break KEYD-UNCOVERED clear
    sent=$(packets esp-break-sent)
    [ "$sent" -ge 5 ] || fail "esp-break: fewer SYNs captured ($sent) than attempts made (5)"
    expect_counter node-a "$p" dropped $((drop0 + sent))
    # The program marked them as steered (counted encrypted); the guard took them back out.
    [ "$(counter node-a "$p" encrypted)" -eq "$enc0" ] ||
        fail "node-a counts the packets its guard dropped as encrypted ($enc0 -> $(counter node-a "$p" encrypted))"
    result policy_esp_break_dropped_by_guard "$sent"
    # node-shim puts the states back by itself (resync_interval). Their sequence numbers start
    # again, which node-b's inbound state refuses as replays: a rotation, which brings a new SPI,
    # is what lets covered traffic through again (docs/node-shim.md says so).
    wait_for 30 "node-a to restore its XFRM policies (resync_interval)" xfrm_has_policies node-a
    local spi
    spi=$(outbound_spi node-a)
    keyctl ipsec rotate >> "$LOGS/keyctl.log"
    for n in node-a node-b; do
        wait_for 60 "$n to send with the new key" outbound_spi_is_not "$n" "$spi"
    done
    start_capture esp-restored
    start_flow esp-restored 10.2.0.2 5432 KEYD-COVERED-V4
    sleep 7
    stop_flow esp-restored
    stop_capture esp-restored
    check_wire esp-restored 'ESP(spi=' encrypted
    result policy_esp_restored yes
    stop_shim node-a
    stop_shim node-b
    kapi DELETE "$POLICIES/db-ipsec"
}

# --- benchmark: what steering costs on the tunnel's path -----------------------------------------
# Side by side on this kernel, alternating (A B A B, since the host is shared and noisy): TCP
# throughput (iperf3, pod-a to pod-b on the covered port 5432) and ICMP echo round trips through
# WireGuard and through IPsec, with the steering program attached (policy mode: the program marks
# the covered flow into the tunnel) and without it (no [steering]: routes or XFRM policies
# encrypt everything). Needs the policy phases' cluster, keyd and pods.

# bench_run TAG: one iperf3 run and one ping series; appends "bps rtt_ms" to $OUT/TAG.runs.
bench_run() {
    local tag=$1 json bps rtt
    json=$(ns pod-a iperf3 -c 10.2.0.2 -p 5432 -t 4 -J 2>> "$LOGS/iperf3.log") ||
        fail "iperf3 ($tag) failed: $(tail -5 "$LOGS/iperf3.log")"
    bps=$(grep -A12 '"sum_received"' <<< "$json" | grep -o '"bits_per_second":[[:space:]]*[0-9.e+]*' |
        head -1 | grep -o '[0-9.e+]*$') || true
    [ -n "$bps" ] || fail "iperf3 ($tag): no result in its output"
    rtt=$(ns pod-a ping -n -q -c 40 -i 0.05 10.2.0.2 | grep -o 'rtt[^=]*= [0-9.]*/[0-9.]*' |
        cut -d/ -f5) || true
    [ -n "$rtt" ] || fail "ping ($tag) got no reply"
    echo "$bps $rtt" >> "$OUT/$tag.runs"
    log "  $tag: $(awk -v b="$bps" 'BEGIN { printf "%.0f Mbit/s", b / 1e6 }'), ping $rtt ms"
}

steering_bench() {
    log "benchmark: steering on the tunnel's path (iperf3 and ping, with and without the program)"
    ip netns exec pod-b iperf3 -s -p 5432 > "$LOGS/iperf3-server.log" 2>&1 &
    local server=$! mode round tag policy
    # All mode routes every peer CIDR through WireGuard; the cluster network's routes would
    # compete with those.
    cni_routes del
    for mode in wireguard ipsec; do
        policy="bench-$mode"
        db_policy "$policy" "$mode"
        [ "$mode" = wireguard ] || cni_routes add
        rm -f "$OUT/steer-$mode-plain.runs" "$OUT/steer-$mode-steered.runs"
        for round in 1 2; do
            for tag in plain steered; do
                if [ "$tag" = steered ]; then
                    start_shims "$mode" "bench-$mode-$tag" policy
                else
                    start_shims "$mode" "bench-$mode-$tag"
                fi
                # The tunnel is up (a handshake, a first ESP packet) before anything is timed.
                ns pod-a ping -c 2 -W 5 10.2.0.2 > /dev/null || fail "$tag: pod-a cannot reach pod-b"
                bench_run "steer-$mode-$tag"
            done
        done
        stop_shim node-a
        stop_shim node-b
        kapi DELETE "$POLICIES/$policy"
        if [ "$mode" = wireguard ]; then
            for n in node-a node-b; do ns "$n" ip link del keyd-wg0; done
        fi
        # Mean over the runs, then the ratios steered / plain.
        local p s
        p=$(awk '{ b += $1; r += $2 } END { printf "%.0f %.3f", b / NR, r / NR }' "$OUT/steer-$mode-plain.runs")
        s=$(awk '{ b += $1; r += $2 } END { printf "%.0f %.3f", b / NR, r / NR }' "$OUT/steer-$mode-steered.runs")
        result "bench_steer_${mode}_plain_mbps" "$(awk -v v="${p% *}" 'BEGIN { printf "%.1f", v / 1e6 }')"
        result "bench_steer_${mode}_steered_mbps" "$(awk -v v="${s% *}" 'BEGIN { printf "%.1f", v / 1e6 }')"
        result "bench_steer_${mode}_throughput_ratio" "$(awk -v a="${s% *}" -v b="${p% *}" 'BEGIN { printf "%.3f", a / b }')"
        result "bench_steer_${mode}_plain_rtt_ms" "${p#* }"
        result "bench_steer_${mode}_steered_rtt_ms" "${s#* }"
        result "bench_steer_${mode}_rtt_ratio" "$(awk -v a="${s#* }" -v b="${p#* }" 'BEGIN { printf "%.3f", a / b }')"
    done
    kill "$server" 2>/dev/null || true
    wait "$server" 2>/dev/null || true
}

bench() {
    log "benchmark: 1,000 peers, node-shim vs ip -batch / tc -batch / wg setconf"
    "$BIN/node-shim-bench" --peers 1000 --work /tmp/bench --out "$OUT/bench.txt" > "$LOGS/bench.log" 2>&1 ||
        fail "benchmark: $(tail -n 20 "$LOGS/bench.log")"
    cat "$OUT/bench.txt" >> "$RES"
}

need_kube() {
    [ -x "${KUBE_CLUSTER:-}" ] || fail "KUBE_CLUSTER (keyd-tests' kube-cluster binary) is not set"
    [ -n "${KUBE_TEST_APISERVER:-}" ] || unset KUBE_TEST_APISERVER
}
policy_phases() {
    policy_setup
    policy_wireguard_phase
    policy_ipsec_phase
}

for w in $WHAT; do
    case $w in
    e2e)
        need_kube
        topology
        start_kube
        start_keyd
        wireguard_phase
        ipsec_phase
        policy_phases
        ;;
    policy)
        # The policy phases alone (to work on them): all they need from the earlier phases is
        # an IPsec key.
        need_kube
        topology
        start_kube
        start_keyd
        keyctl ipsec rotate > "$LOGS/keyctl.log"
        policy_phases
        ;;
    bench)
        bench
        # After the policy phases, which set up what it needs.
        if [ -n "${POLICY_READY:-}" ]; then steering_bench; fi
        ;;
    esac
done
[ -z "${KEYD_PID:-}" ] || kill "$KEYD_PID" 2>/dev/null || true
if [ -n "${KUBE_PID:-}" ]; then
    kill -TERM "$KUBE_PID" 2>/dev/null || true
    wait "$KUBE_PID" 2>/dev/null || true
fi
echo "VM-E2E: PASS" >> "$RES"
log "all passed"

#!/bin/sh
# The smoke test of `cargo xtask vm`: client -> node (lb-agent) -> pod in network
# namespaces, one ClusterIP Service (10.96.0.10:80 -> pod-1 10.201.0.2:8080), one TCP
# connection through it, then a `kill -9` of the agent and a new agent while a
# connection is held open, then `lb-agent --cleanup` detaching the programs. Runs as the
# guest's command, and on the host for the kernel table (LBVM_* variables below). Prints
# `LBVM-FEATURE` and `LBVM-STEP` lines that the host parses; exits non-zero if a step
# failed. POSIX sh (busybox in the guest).
set -u
P=${LBVM_PREFIX:-lbvm}
BIN=${LBVM_BIN:-/lbvm}
ROOT=${LBVM_BPFFS:-/sys/fs/bpf/lb}
MAN=${LBVM_MANIFESTS:-/lbvm/manifests}
# iproute2's ip (busybox's lacks veths and namespaces, and busybox's shell prefers its
# own applets to PATH: the guest names the file).
IP=${LBVM_IP:-ip}
WORK=$(mktemp -d)
VIP=10.96.0.10:80
failed=0
agent=
server=
holder=

# Background processes are started with nsenter itself (`nsenter ... &`), not through
# in_ns: `$!` must be the process (nsenter execs it), not a subshell whose kill would
# leave the process running.
in_ns() { ns=$1; shift; nsenter --net="/run/netns/$P-$ns" "$@"; }
step() {
    name=$1; shift
    if "$@"; then echo "LBVM-STEP $name ok"; else echo "LBVM-STEP $name FAILED"; failed=1; fi
}
# wait_for SECONDS FILE TEXT
wait_for() {
    i=0
    while [ "$i" -lt "$(($1 * 10))" ]; do
        grep -q "$3" "$2" 2>/dev/null && return 0
        sleep 0.1; i=$((i + 1))
    done
    echo "timed out after $1 s waiting for '$3' in $2:" >&2; cat "$2" >&2
    return 1
}
cleanup() {
    exec 3>&- 2>/dev/null
    for pid in $holder $agent $server; do kill -9 "$pid" 2>/dev/null; done
    wait 2>/dev/null
    in_ns node "$BIN/lb-agent" --cleanup --bpffs-root "$ROOT" >/dev/null 2>&1
    for ns in client pod node; do "$IP" netns del "$P-$ns" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

features() {
    "$BIN/lb-agent" --kernel-features --bpffs-root "$ROOT" --log-level warn >"$WORK/features" 2>&1
    rc=$?
    sed 's/^/LBVM-FEATURE /' "$WORK/features"
    return $rc
}

# link NS NET: a veth pair node:veth-X <-> NS:eth0 on 10.NET.0.0/24, default via the node.
link() {
    "$IP" -n "$P-node" link add "veth-$1" type veth peer name eth0 netns "$P-$1" &&
    "$IP" -n "$P-node" addr add "10.$2.0.1/24" dev "veth-$1" &&
    "$IP" -n "$P-node" link set "veth-$1" up &&
    "$IP" -n "$P-$1" addr add "10.$2.0.2/24" dev eth0 &&
    "$IP" -n "$P-$1" link set eth0 up &&
    "$IP" -n "$P-$1" link set lo up &&
    "$IP" -n "$P-$1" route add default via "10.$2.0.1"
}
topology() {
    for ns in node client pod; do "$IP" netns add "$P-$ns" || return 1; done
    "$IP" -n "$P-node" link set lo up &&
    link client 200 && link pod 201 &&
    in_ns node sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward;
        echo 0 >/proc/sys/net/ipv4/conf/all/rp_filter;
        echo 0 >/proc/sys/net/ipv4/conf/default/rp_filter'
}

start_agent() {
    nsenter --net="/run/netns/$P-node" "$BIN/lb-agent" --manifests "$MAN" --devices 'veth*' \
        --bpffs-root "$ROOT" --healthz-bind-address '' --metrics-bind-address '' \
        >"$WORK/agent-$1.log" 2>&1 &
    agent=$!
    wait_for 60 "$WORK/agent-$1.log" "lb-agent ready" &&
        sed 's/^/  agent: /' "$WORK/agent-$1.log"
}

server() {
    nsenter --net="/run/netns/$P-pod" "$BIN/lbt-server" --name pod-1 --tcp 8080 \
        >"$WORK/server.log" 2>&1 &
    server=$!
    i=0
    # Ready when it accepts on the pod's address.
    until in_ns pod "$BIN/lbt-client" tcp 10.201.0.2:8080 >/dev/null 2>&1; do
        i=$((i + 1)); [ "$i" -gt 100 ] && return 1; sleep 0.1
    done
}

connect() {
    out=$(in_ns client "$BIN/lbt-client" tcp "$VIP" --timeout-ms 5000) || return 1
    echo "  $VIP answered: $out"
    case $out in pod-1\ 10.200.0.2:*) return 0 ;; *) return 1 ;; esac
}

hold() {
    mkfifo "$WORK/in" || return 1
    nsenter --net="/run/netns/$P-client" "$BIN/lbt-client" hold "$VIP" --timeout-ms 5000 \
        <"$WORK/in" >"$WORK/held" 2>&1 &
    holder=$!
    exec 3>"$WORK/in"
    echo before >&3
    wait_for 10 "$WORK/held" "pod-1: before"
}

restart() {
    kill -9 "$agent" && wait "$agent" 2>/dev/null
    start_agent 2
}

held_after_restart() {
    echo after >&3
    wait_for 10 "$WORK/held" "pod-1: after"
}

# `lb-agent --cleanup` detaches the programs (tcx links or netlink filters): the ClusterIP
# stops answering.
detached_after_cleanup() {
    kill -9 "$agent" && wait "$agent" 2>/dev/null
    agent=
    in_ns node "$BIN/lb-agent" --cleanup --bpffs-root "$ROOT" >"$WORK/cleanup.log" 2>&1 ||
        { cat "$WORK/cleanup.log" >&2; return 1; }
    if in_ns client "$BIN/lbt-client" tcp "$VIP" --timeout-ms 2000 >/dev/null 2>&1; then
        echo "$VIP still answers after lb-agent --cleanup" >&2
        return 1
    fi
}

step kernel-features features
step topology topology
step pod-server server
step agent-ready start_agent 1
step clusterip-tcp connect
step hold-connection hold
step agent-restart restart
step held-flow-survives-restart held_after_restart
step clusterip-tcp-after-restart connect
step cleanup-detaches detached_after_cleanup
exit $failed

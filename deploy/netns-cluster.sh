#!/usr/bin/env bash
# Two pvmig hosts on one machine: network namespaces joined by a veth pair, optionally
# shaped with tc tbf, an agent in each. The cheap way to put a real network (its own
# addresses, a bandwidth cap, no loopback shortcuts) between two agents.
#
#   deploy/netns-cluster.sh up [--rate 200mbit] [--base DIR] [--prefix pvmig-]
#                              [--subnet 10.77.0] [--port 7000] [-- AGENT-ARGS...]
#   deploy/netns-cluster.sh exec a|b COMMAND...     # run COMMAND on host a or b
#   deploy/netns-cluster.sh status [--base DIR] [--prefix pvmig-]
#   deploy/netns-cluster.sh down [--base DIR] [--prefix pvmig-]
#
# The hosts are the namespaces PREFIXa and PREFIXb with SUBNET.1 and SUBNET.2 on their
# veth0; the veth pair lives entirely inside them, so the root namespace gets no new
# interface or route and several clusters (different prefixes) can share one subnet.
# The root namespace cannot reach the agents: run the coordinator on one of the hosts,
# as Xen's toolstack runs on the source host:
#   deploy/netns-cluster.sh exec a pvmig migrate --source 10.77.0.1:7000 \
#       --dest 10.77.0.2:7000 --domain vm
# /dev/shm and the file system are shared by both hosts, so a disk image under any path
# (say /tmp/vm.img) is shared storage; each agent gets a guest RAM directory of its own,
# and a storage dir of its own (BASE/HOST/storage): a disk named by a relative path
# (--disk vm.img) lives there, on that host only (migrate --copy-storage moves it).
#
# PVMIG names the pvmig command (default: pvmig on PATH), e.g. PVMIG=.venv/bin/pvmig;
# PVMIG_NETNS_PREFIX the default prefix (for exec, which takes no options).
# `up` writes BASE/cluster.json ({"a": "SUBNET.1:PORT", "b": ..., namespaces, rate})
# once both agents serve and each reaches the other across the link. `down` ends every
# process in the two namespaces (the agents and their guests), then deletes them; it
# works after a failed or partial `up`, and when nothing is up.
set -Eeuo pipefail

PROG=$(basename "$0")
READY_TIMEOUT_S=30
STOP_TIMEOUT_S=10

die() { echo "$PROG: $*" >&2; exit 1; }

usage() {
    sed -n '6,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prefix=${PVMIG_NETNS_PREFIX:-pvmig-}
base=""
rate=""
subnet=10.77.0
port=7000
agent_args=()

parse_options() {
    while (($#)); do
        case $1 in
            --rate) rate=${2:?--rate needs a value, e.g. 200mbit}; shift 2 ;;
            --base) base=${2:?--base needs a directory}; shift 2 ;;
            --prefix) prefix=${2:?--prefix needs a value}; shift 2 ;;
            --subnet) subnet=${2:?--subnet needs the first three octets, e.g. 10.77.0}; shift 2 ;;
            --port) port=${2:?--port needs a number}; shift 2 ;;
            --) shift; agent_args=("$@"); break ;;
            *) die "unknown option '$1'" ;;
        esac
    done
    base=${base:-${TMPDIR:-/tmp}/${prefix}cluster}
    [[ $subnet =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] \
        || die "--subnet '$subnet' is not three octets such as 10.77.0"
    if ! [[ $port =~ ^[0-9]+$ ]] || ((port < 1 || port > 65535)); then
        die "--port '$port' is not a port"
    fi
    [[ -z $rate || $rate =~ ^[1-9][0-9]*(kbit|mbit|gbit)$ ]] \
        || die "--rate '$rate' is not a rate such as 200mbit (kbit, mbit or gbit)"
}

ns_of() { echo "${prefix}$1"; }
addr_of() { case $1 in a) echo "$subnet.1" ;; b) echo "$subnet.2" ;; esac; }
mem_root() { echo "/dev/shm/${prefix}cluster"; }
ns_exists() { ip netns list | awk '{print $1}' | grep -qxF "$1"; }

need_root() {
    [[ $(id -u) == 0 ]] || die "not root: network namespaces need root (try sudo $PROG $*)"
    command -v ip >/dev/null || die "'ip' not found: install iproute2"
}

# ---- down

stop_ns() {
    local ns=$1 pids deadline
    ns_exists "$ns" || return 0
    # Everything in the namespace is ours: the agent and the guests it started.
    mapfile -t pids < <(ip netns pids "$ns" || true)
    if ((${#pids[@]})); then
        kill -TERM "${pids[@]}" 2>/dev/null || true
        deadline=$((SECONDS + STOP_TIMEOUT_S))
        while [[ -n $(ip netns pids "$ns" || true) ]] && ((SECONDS < deadline)); do
            sleep 0.1
        done
        mapfile -t pids < <(ip netns pids "$ns" || true)
        if ((${#pids[@]})); then
            echo "$PROG: $ns: still running after ${STOP_TIMEOUT_S}s, killing: ${pids[*]}" >&2
            kill -KILL "${pids[@]}" 2>/dev/null || true
        fi
    fi
    # Deleting the namespace deletes its veth end, and with it the other end.
    ip netns delete "$ns"
}

cmd_down() {
    parse_options "$@"
    need_root down
    local h
    for h in a b; do stop_ns "$(ns_of "$h")"; done
    rm -rf "$(mem_root)"
    rm -f "$base/cluster.json" "$base"/{a,b}/agent.pid "$base"/{a,b}/ready.json
    echo "down: ${prefix}a and ${prefix}b removed"
}

# ---- up

start_agent() {
    local h=$1 ns addr dir
    ns=$(ns_of "$h"); addr=$(addr_of "$h"); dir=$base/$h
    mkdir -p "$dir/data" "$dir/storage" "$(mem_root)/$h"
    rm -f "$dir/ready.json"
    # setsid: the agent outlives this script and no terminal signal reaches it; ip netns
    # exec and setsid both exec, so $! is the agent's own pid.
    setsid ip netns exec "$ns" "${pvmig_cmd[@]}" agent \
        --listen "$addr:$port" --advertise "$addr:$port" --name "$h" \
        --data-dir "$dir/data" --mem-dir "$(mem_root)/$h" --ready-file "$dir/ready.json" \
        --storage-dir "$dir/storage" \
        ${agent_args[@]+"${agent_args[@]}"} \
        </dev/null >>"$dir/agent.log" 2>&1 &
    echo $! >"$dir/agent.pid"
}

wait_ready() {
    local h=$1 dir=$base/$1 pid deadline
    pid=$(cat "$dir/agent.pid")
    deadline=$((SECONDS + READY_TIMEOUT_S))
    until [[ -s $dir/ready.json ]]; do
        if ! kill -0 "$pid" 2>/dev/null; then
            echo "$PROG: agent $h exited; the end of $dir/agent.log:" >&2
            tail -n 20 "$dir/agent.log" >&2 || true
            return 1
        fi
        ((SECONDS < deadline)) || { echo "$PROG: agent $h not ready in ${READY_TIMEOUT_S}s" \
            "(see $dir/agent.log)" >&2; return 1; }
        sleep 0.1
    done
}

# A TCP connection from each host to the other's agent proves the link, the addresses
# and the listening sockets together (bash's /dev/tcp: nothing else to install).
check_link() {
    local from=$1 to=$2
    timeout 5 ip netns exec "$(ns_of "$from")" bash -c \
        "exec 3<>/dev/tcp/$(addr_of "$to")/$port" 2>/dev/null \
        || { echo "$PROG: host $from cannot reach the agent of $to at" \
                  "$(addr_of "$to"):$port" >&2; return 1; }
}

# 10 ms at the rate, at least 32 KiB: a bucket smaller than a timer tick's worth of
# bytes caps the link below its rate, a much larger one lets bursts through unshaped.
burst_for() {
    local n=${1%%[kmg]bit} unit=${1##*[0-9]} bytes_per_s
    case $unit in
        kbit) bytes_per_s=$((n * 1000 / 8)) ;;
        mbit) bytes_per_s=$((n * 1000000 / 8)) ;;
        gbit) bytes_per_s=$((n * 1000000000 / 8)) ;;
    esac
    local burst=$((bytes_per_s / 100))
    echo $((burst > 32768 ? burst : 32768))
}

cmd_up() {
    parse_options "$@"
    need_root up
    read -r -a pvmig_cmd <<<"${PVMIG:-pvmig}"
    command -v "${pvmig_cmd[0]}" >/dev/null \
        || die "pvmig command '${pvmig_cmd[0]}' not found:" \
               "put pvmig on PATH or set PVMIG=/path/to/pvmig"
    [[ -z $rate ]] || command -v tc >/dev/null || die "'tc' not found (iproute2): needed for --rate"
    local h
    for h in a b; do
        ! ns_exists "$(ns_of "$h")" \
            || die "namespace $(ns_of "$h") exists already: run '$PROG down --prefix $prefix' first"
    done
    # A failed up leaves nothing behind but the logs.
    up_done=""
    trap 'if [[ -z $up_done ]]; then echo "$PROG: up failed, tearing down" >&2;
          cmd_down --prefix "$prefix" --base "$base" >/dev/null 2>&1 || true; fi' EXIT
    mkdir -p "$base"
    for h in a b; do
        ip netns add "$(ns_of "$h")"
        ip -n "$(ns_of "$h")" link set lo up
    done
    ip link add veth0 netns "$(ns_of a)" type veth peer name veth0 netns "$(ns_of b)"
    for h in a b; do
        ip -n "$(ns_of "$h")" addr add "$(addr_of "$h")/24" dev veth0
        ip -n "$(ns_of "$h")" link set veth0 up
        if [[ -n $rate ]]; then
            # tbf on each end's egress shapes both directions (netem is missing from
            # some kernels, tbf is not).
            ip netns exec "$(ns_of "$h")" tc qdisc add dev veth0 root tbf rate "$rate" \
                burst "$(burst_for "$rate")" latency 50ms
        fi
    done
    for h in a b; do start_agent "$h"; done
    for h in a b; do wait_ready "$h"; done
    check_link a b
    check_link b a
    up_done=1
    cat >"$base/cluster.json" <<EOF
{"a": "$(addr_of a):$port", "b": "$(addr_of b):$port",
 "namespaces": {"a": "$(ns_of a)", "b": "$(ns_of b)"}, "rate": "${rate:-unshaped}", "base": "$base"}
EOF
    for h in a b; do
        echo "host $h: namespace $(ns_of "$h"), agent $(addr_of "$h"):$port" \
             "(pid $(cat "$base/$h/agent.pid"), log $base/$h/agent.log)"
    done
    echo "link: veth0 <-> veth0, ${rate:-not shaped}"
    echo "run the coordinator on a host: $PROG exec a pvmig migrate" \
         "--source $(addr_of a):$port --dest $(addr_of b):$port --domain NAME"
}

# ---- status, exec

cmd_status() {
    parse_options "$@"
    need_root status
    local h ns pid
    for h in a b; do
        ns=$(ns_of "$h")
        if ! ns_exists "$ns"; then echo "host $h: namespace $ns absent"; continue; fi
        pid=$(cat "$base/$h/agent.pid" 2>/dev/null || echo "")
        if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then
            echo "host $h: namespace $ns, agent $(addr_of "$h"):$port running (pid $pid)"
        else
            echo "host $h: namespace $ns, no agent running (log: $base/$h/agent.log)"
        fi
        ip -n "$ns" -br addr show dev veth0 2>/dev/null | sed 's/^/  /' || true
        ip netns exec "$ns" tc qdisc show dev veth0 2>/dev/null | sed 's/^/  /' || true
    done
}

cmd_exec() {
    (($# >= 2)) || die "usage: $PROG exec a|b COMMAND..."
    local h=$1; shift
    [[ $h == a || $h == b ]] || die "exec: host must be a or b, not '$h'"
    need_root exec
    ns_exists "$(ns_of "$h")" || die "namespace $(ns_of "$h") absent: run '$PROG up' first"
    exec ip netns exec "$(ns_of "$h")" "$@"
}

(($#)) || usage
command=$1; shift
case $command in
    up) cmd_up "$@" ;;
    down) cmd_down "$@" ;;
    status) cmd_status "$@" ;;
    exec) cmd_exec "$@" ;;
    -h|--help|help) usage ;;
    *) die "unknown command '$command' (up, down, status, exec)" ;;
esac

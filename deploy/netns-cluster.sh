#!/usr/bin/env bash
# N pvmig hosts on one machine (2 by default): network namespaces on one switch (a
# bridge in a namespace of its own), each host's uplink optionally shaped with tc tbf,
# an agent in each. The cheap way to put a real network (its own addresses, a bandwidth
# cap, contention for a link, no loopback shortcuts) between agents.
#
#   deploy/netns-cluster.sh up [--hosts N] [--rate 200mbit] [--base DIR] [--prefix pvmig-]
#                              [--subnet 10.77.0] [--port 7000] [-- AGENT-ARGS...]
#   deploy/netns-cluster.sh exec HOST COMMAND...   # run COMMAND on host a, b, c...
#   deploy/netns-cluster.sh status [--base DIR] [--prefix pvmig-]
#   deploy/netns-cluster.sh down [--base DIR] [--prefix pvmig-]
#
# The hosts are the namespaces PREFIXa, PREFIXb, ... (N of them, 2 to 16) with
# SUBNET.1, SUBNET.2, ... on their veth0; the other end of each is a port of the bridge
# in PREFIXswitch. --rate shapes both directions of every uplink (the host's veth0 and
# its port on the switch): the migrations out of one host share its uplink's rate, as
# they would share a NIC. Nothing is added to the root namespace (no interface, no
# route), so several clusters (different prefixes) can share one subnet.
# The root namespace cannot reach the agents: run the coordinator (or pvmig evacuate)
# on one of the hosts, as Xen's toolstack runs on the source host:
#   deploy/netns-cluster.sh exec a pvmig migrate --source 10.77.0.1:7000 \
#       --dest 10.77.0.2:7000 --domain vm
#   deploy/netns-cluster.sh exec a pvmig evacuate a --fleet BASE/fleet.toml
# /dev/shm and the file system are shared by all hosts, so a disk image under any path
# (say /tmp/vm.img) is shared storage; each agent gets a guest RAM directory of its own,
# and a storage dir of its own (BASE/HOST/storage): a disk named by a relative path
# (--disk vm.img) lives there, on that host only (migrate --copy-storage moves it).
#
# PVMIG names the pvmig command (default: pvmig on PATH), e.g. PVMIG=.venv/bin/pvmig;
# PVMIG_NETNS_PREFIX the default prefix (for exec, which takes no options).
# `up` writes BASE/cluster.json ({"a": "SUBNET.1:PORT", ..., "hosts", namespaces, rate})
# and BASE/fleet.toml (the agents, for pvmig evacuate and rebalance) once every agent
# serves and reaches the others across the switch. `down` ends every process in the
# cluster's namespaces (the agents and their guests), then deletes them; it works after
# a failed or partial `up`, and when nothing is up.
set -Eeuo pipefail

PROG=$(basename "$0")
READY_TIMEOUT_S=30
STOP_TIMEOUT_S=10

die() { echo "$PROG: $*" >&2; exit 1; }

usage() {
    sed -n '7,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

prefix=${PVMIG_NETNS_PREFIX:-pvmig-}
base=""
rate=""
subnet=10.77.0
port=7000
nhosts=2
agent_args=()
HOST_NAMES=(a b c d e f g h i j k l m n o p)

parse_options() {
    while (($#)); do
        case $1 in
            --hosts) nhosts=${2:?--hosts needs a number of hosts}; shift 2 ;;
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
    if ! [[ $nhosts =~ ^[0-9]+$ ]] || ((nhosts < 2 || nhosts > ${#HOST_NAMES[@]})); then
        die "--hosts '$nhosts' is not a number of hosts from 2 to ${#HOST_NAMES[@]}"
    fi
    hosts=("${HOST_NAMES[@]:0:nhosts}")
    [[ -z $rate || $rate =~ ^[1-9][0-9]*(kbit|mbit|gbit)$ ]] \
        || die "--rate '$rate' is not a rate such as 200mbit (kbit, mbit or gbit)"
}

ns_of() { echo "${prefix}$1"; }
switch_ns() { echo "${prefix}switch"; }
index_of() {
    local i
    for i in "${!HOST_NAMES[@]}"; do
        [[ ${HOST_NAMES[$i]} == "$1" ]] && { echo "$i"; return 0; }
    done
    return 1
}
addr_of() { echo "$subnet.$(($(index_of "$1") + 1))"; }
# the hosts this prefix has namespaces for (down and status need no --hosts)
hosts_up() {
    local h
    for h in "${HOST_NAMES[@]}"; do
        if ns_exists "$(ns_of "$h")"; then echo "$h"; fi
    done
}
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
    local h gone=()
    mapfile -t gone < <(hosts_up)
    for h in "${gone[@]}"; do stop_ns "$(ns_of "$h")"; done
    stop_ns "$(switch_ns)"
    rm -rf "$(mem_root)"
    rm -f "$base/cluster.json" "$base/fleet.toml"
    for h in "${HOST_NAMES[@]}"; do rm -f "$base/$h/agent.pid" "$base/$h/ready.json"; done
    echo "down: ${#gone[@]} hosts (${gone[*]:-none}) and the switch removed"
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
    local h other sw
    sw=$(switch_ns)
    for h in "${hosts[@]}" switch; do
        ! ns_exists "$(ns_of "$h")" \
            || die "namespace $(ns_of "$h") exists already: run '$PROG down --prefix $prefix' first"
    done
    # A failed up leaves nothing behind but the logs.
    up_done=""
    trap 'if [[ -z $up_done ]]; then echo "$PROG: up failed, tearing down" >&2;
          cmd_down --prefix "$prefix" --base "$base" >/dev/null 2>&1 || true; fi' EXIT
    mkdir -p "$base"
    ip netns add "$sw"
    ip -n "$sw" link add br0 type bridge
    ip -n "$sw" link set br0 up
    for h in "${hosts[@]}"; do
        ip netns add "$(ns_of "$h")"
        ip -n "$(ns_of "$h")" link set lo up
        # the host's uplink: veth0 in its namespace, port up-HOST on the switch
        ip link add veth0 netns "$(ns_of "$h")" type veth peer name "up-$h" netns "$sw"
        ip -n "$sw" link set "up-$h" master br0 up
        ip -n "$(ns_of "$h")" addr add "$(addr_of "$h")/24" dev veth0
        ip -n "$(ns_of "$h")" link set veth0 up
        if [[ -n $rate ]]; then
            # tbf on the egress of both ends shapes both directions (netem is missing
            # from some kernels, tbf is not)
            ip netns exec "$(ns_of "$h")" tc qdisc add dev veth0 root tbf rate "$rate" \
                burst "$(burst_for "$rate")" latency 50ms
            ip netns exec "$sw" tc qdisc add dev "up-$h" root tbf rate "$rate" \
                burst "$(burst_for "$rate")" latency 50ms
        fi
    done
    for h in "${hosts[@]}"; do start_agent "$h"; done
    for h in "${hosts[@]}"; do wait_ready "$h"; done
    for other in "${hosts[@]:1}"; do  # through the switch, both ways
        check_link a "$other"
        check_link "$other" a
    done
    up_done=1
    local addrs="" names="" quoted=""
    for h in "${hosts[@]}"; do
        addrs+="\"$h\": \"$(addr_of "$h"):$port\", "
        names+="${names:+, }\"$h\": \"$(ns_of "$h")\""
        quoted+="${quoted:+, }\"$h\""
    done
    cat >"$base/cluster.json" <<EOF
{${addrs}"hosts": [$quoted], "namespaces": {$names}, "switch": "$sw",
 "rate": "${rate:-unshaped}", "base": "$base", "fleet": "$base/fleet.toml"}
EOF
    {
        echo "# written by $PROG up: the agents of this cluster (see docs/FLEET.md)"
        echo "[fleet]"
        for h in "${hosts[@]}"; do
            printf '\n[[agents]]\nname = "%s"\naddress = "%s:%s"\n' "$h" "$(addr_of "$h")" "$port"
        done
    } >"$base/fleet.toml"
    for h in "${hosts[@]}"; do
        echo "host $h: namespace $(ns_of "$h"), agent $(addr_of "$h"):$port" \
             "(pid $(cat "$base/$h/agent.pid"), log $base/$h/agent.log)"
    done
    echo "switch: br0 in $sw, ${#hosts[@]} uplinks, each ${rate:-not shaped}"
    echo "fleet file: $base/fleet.toml"
    echo "run the coordinator on a host: $PROG exec a pvmig migrate" \
         "--source $(addr_of a):$port --dest $(addr_of b):$port --domain NAME"
}

# ---- status, exec

cmd_status() {
    parse_options "$@"
    need_root status
    local h ns pid shown=()
    mapfile -t shown < <(hosts_up)
    ((${#shown[@]})) || echo "no hosts up with prefix $prefix"
    for h in "${shown[@]}"; do
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
    if ns_exists "$(switch_ns)"; then
        echo "switch: $(switch_ns)"
        ip -n "$(switch_ns)" -br link show master br0 2>/dev/null | sed 's/^/  /' || true
    fi
}

cmd_exec() {
    (($# >= 2)) || die "usage: $PROG exec HOST COMMAND..."
    local h=$1; shift
    index_of "$h" >/dev/null || die "exec: a host is one of ${HOST_NAMES[*]}, not '$h'"
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

#!/usr/bin/env bash
# The study of docs/FLEET.md: evacuate 4 busy guests of RAM_MB each from host a of
# three netns hosts whose uplinks are shaped to RATE, under each pair of caps given
# (parallel_migrations/parallel_outbound_per_host), RUNS times each, with
# `pvmig scenario run`; then one line per run and the spread of downtime per caps.
#
#   sudo docs/scripts/fleet_study.sh OUT [RATE=1gbit] [RAM_MB=256] [DIRTY=3000] \
#        [RUNS=2] [CAPS="4/4 2/2 1/1"]
#
# OUT gets the cluster (OUT/cluster), each run's scenario, report and plots
# (OUT/caps-ALL-PER-run-N/), summary.json and downtime.png (docs/scripts/fleet_summary.py).
# Needs root (network namespaces, tc).
set -Eeuo pipefail
here=$(cd "$(dirname "$0")/../.." && pwd)
out=$(realpath -m "${1:?usage: $0 OUT [RATE] [RAM_MB] [DIRTY] [RUNS] [CAPS]}")
rate=${2:-1gbit}; ram=${3:-256}; dirty=${4:-3000}; runs=${5:-2}; caps=${6:-"4/4 2/2 1/1"}
pvmig=${PVMIG:-$here/.venv/bin/pvmig}
cluster="$here/deploy/netns-cluster.sh"
export PVMIG=$pvmig PVMIG_NETNS_PREFIX=pvmig-study-

mkdir -p "$out"
"$cluster" down --base "$out/cluster" >/dev/null 2>&1 || true
trap '"$cluster" down --base "$out/cluster" >/dev/null 2>&1 || true' EXIT
"$cluster" up --hosts 3 --rate "$rate" --base "$out/cluster" -- --max-ram-mb 4096

for cap in $caps; do
    all=${cap%/*}; per=${cap#*/}
    for run in $(seq 1 "$runs"); do
        dir="$out/caps-$all-$per-run-$run"
        mkdir -p "$dir"
        sed "s/^\[fleet\]$/[fleet]\nparallel_migrations = $all\nparallel_outbound_per_host = $per/" \
            "$out/cluster/fleet.toml" > "$dir/fleet.toml"
        {
            echo 'fleet = "fleet.toml"'
            echo "name = \"evacuate-4x$ram-caps-$all-$per\""
            for i in 0 1 2 3; do
                printf '\n[[step]]\nat = 0\ncreate = { domain = "vm%s", host = "a", ram_mb = %s, dirty_rate = %s }\n' \
                    "$i" "$ram" "$dirty"
            done
            printf '\n[[step]]\nat = 0\nevacuate = { host = "a" }\n'
        } > "$dir/scenario.toml"
        echo "== caps $all/$per, run $run"
        "$cluster" exec a "$pvmig" scenario run "$dir/scenario.toml" --out "$dir" \
            2> "$dir/stderr.log" | tail -2
        # the guests go, wherever they are, for the next run
        for h in a b c; do
            addr=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])' \
                   "$out/cluster/cluster.json" "$h")
            for i in 0 1 2 3; do
                "$cluster" exec "$h" "$pvmig" domain destroy "vm$i" --agent "$addr" \
                    >/dev/null 2>&1 || true
            done
        done
    done
done

"$here/.venv/bin/python" "$here/docs/scripts/fleet_summary.py" "$out"

#!/usr/bin/env bash
# More agents for deploy/docker-compose.yml, which has two (a and b): an override file
# adding agents c, d, ... up to N, each built as a is (the same image, capabilities,
# shared volume, network, health check) with its own name, and the fleet file naming all
# N agents for pvmig evacuate and rebalance.
#
#   deploy/compose-agents.sh N [--fleet FILE] > OVERRIDE.yml
#   docker-compose -f deploy/docker-compose.yml -f OVERRIDE.yml -p pvmig up -d
#   docker-compose ... exec -T peer pvmig evacuate a --fleet /shared/fleet.toml
#
# The override extends service a of deploy/docker-compose.yml by its absolute path, so
# it may be written anywhere. The fleet file goes where --fleet says (the agents are
# named by their service names, reachable on the cluster's network: copy it into the
# shared volume, or run pvmig where that path is seen).
set -Eeuo pipefail

PROG=$(basename "$0")
HERE=$(cd "$(dirname "$0")" && pwd)
NAMES=(a b c d e f g h i j k l m n o p)
die() { echo "$PROG: $*" >&2; exit 1; }

(($#)) || die "usage: $PROG N [--fleet FILE]"
n=$1; shift
fleet=""
while (($#)); do
    case $1 in
        --fleet) fleet=${2:?--fleet needs a file}; shift 2 ;;
        *) die "unknown option '$1'" ;;
    esac
done
if ! [[ $n =~ ^[0-9]+$ ]] || ((n < 2 || n > ${#NAMES[@]})); then
    die "N '$n' is not a number of agents from 2 to ${#NAMES[@]}"
fi

echo "# written by $PROG $n: agents ${NAMES[*]:2:n-2} beside a and b"
echo 'version: "2.4"'
echo "services:"
for h in "${NAMES[@]:2:n-2}"; do
    cat <<EOF
  $h:
    extends: {file: "$HERE/docker-compose.yml", service: a}
    hostname: $h
    command: [pvmig, agent, --listen, "0.0.0.0:7000", --advertise, "$h:7000", --name, $h,
              --data-dir, /var/lib/pvmig, --mem-dir, /dev/shm/pvmig/$h,
              --storage-dir, /var/lib/pvmig/storage, --ready-file, /run/pvmig-ready.json,
              --metrics-listen, "0.0.0.0:9100"]
EOF
done
if ((n > 2)); then
    echo "  peer:"
    echo "    depends_on:"
    for h in "${NAMES[@]:2:n-2}"; do echo "      $h: {condition: service_healthy}"; done
fi

if [[ -n $fleet ]]; then
    {
        echo "# written by $PROG: the agents of the compose cluster (see docs/FLEET.md)"
        echo "[fleet]"
        for h in "${NAMES[@]:0:n}"; do
            printf '\n[[agents]]\nname = "%s"\naddress = "%s:7000"\n' "$h" "$h"
        done
    } >"$fleet"
fi

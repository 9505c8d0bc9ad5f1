#!/usr/bin/env bash
# A real Ray cluster on loopback: one head plus one extra worker node, token auth on.
#   infra/local/up.sh            # prints the RAY_ADDRESS to submit to
# Env: VENV (default .venv), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), HEAD_CPUS (2),
#      WORKER_CPUS (2), RAY_CLIENT_PORT (10001), HEAD_AGENT_PORT (52365), WORKER_AGENT_PORT
#      (52366): each node's job agent needs its own port (another Ray here may hold 52365),
#      RAY_TEMP_DIR (/tmp/ray-gpthf-$RAY_PORT).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${VENV:-.venv}
[[ "$venv" = /* ]] || venv="$PWD/$venv"
export PATH="$venv/bin:$PATH"
export RAY_AUTH_MODE=token  # Ray 2.60: submissions and joining nodes need the token
port=${RAY_PORT:-6379}
dash=${RAY_DASHBOARD_PORT:-8265}
# A temp dir of its own: down.sh stops exactly this cluster's processes by it.
temp=${RAY_TEMP_DIR:-/tmp/ray-gpthf-$port}
ray start --head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="${HEAD_CPUS:-2}" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dash" --disable-usage-stats --temp-dir="$temp" \
  --ray-client-server-port="${RAY_CLIENT_PORT:-10001}" \
  --dashboard-agent-listen-port="${HEAD_AGENT_PORT:-52365}" >/dev/null
ray start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 --num-cpus="${WORKER_CPUS:-2}" \
  --disable-usage-stats --dashboard-agent-listen-port="${WORKER_AGENT_PORT:-52366}" >/dev/null
echo "RAY_ADDRESS=http://127.0.0.1:$dash"

#!/usr/bin/env bash
# A real Ray cluster on loopback: one head plus one extra worker node, token auth on.
#   infra/local/up.sh            # prints the RAY_ADDRESS to submit to
# Env: VENV (default .venv), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), HEAD_CPUS (2),
#      WORKER_CPUS (2), RAY_TEMP_DIR (Ray's default /tmp/ray).
set -euo pipefail
cd "$(dirname "$0")/../.."
export PATH="$PWD/${VENV:-.venv}/bin:$PATH"
export RAY_AUTH_MODE=token  # Ray 2.60: submissions and joining nodes need the token
port=${RAY_PORT:-6379}
dash=${RAY_DASHBOARD_PORT:-8265}
temp=()
[ -n "${RAY_TEMP_DIR:-}" ] && temp=(--temp-dir="$RAY_TEMP_DIR")
ray start --head --node-ip-address=127.0.0.1 --port="$port" --num-cpus="${HEAD_CPUS:-2}" \
  --dashboard-host=127.0.0.1 --dashboard-port="$dash" --disable-usage-stats "${temp[@]}" \
  --ray-client-server-port=0 >/dev/null
ray start --address="127.0.0.1:$port" --node-ip-address=127.0.0.1 --num-cpus="${WORKER_CPUS:-2}" \
  --disable-usage-stats >/dev/null
echo "RAY_ADDRESS=http://127.0.0.1:$dash"

#!/usr/bin/env bash
# A real Ray cluster on loopback: one head plus one extra worker node, token auth on.
#   infra/local/up.sh            # prints the RAY_ADDRESS to submit to
# Env: VENV (default .venv), RAY_PORT (6379), RAY_DASHBOARD_PORT (8265), HEAD_CPUS (2),
#      WORKER_CPUS (2), RAY_CLIENT_PORT (10001), HEAD_AGENT_PORT (52365), WORKER_AGENT_PORT
#      (52366): each node's job agent needs its own port (another Ray here may hold 52365),
#      RAY_TEMP_DIR (/tmp/ray-gpthf-$RAY_PORT), RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH (the
#      token; default ~/.ray/auth_token, created if missing).
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${VENV:-.venv}
[[ "$venv" = /* ]] || venv="$PWD/$venv"
export PATH="$venv/bin:$PATH"
export RAY_AUTH_MODE=token  # Ray 2.60: submissions and joining nodes need the token
# `ray start` in token mode needs a token: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH,
# else ~/.ray/auth_token. On a clean machine none exists, so create ~/.ray/auth_token (0600).
if [[ -z "${RAY_AUTH_TOKEN:-}" && -n "${RAY_AUTH_TOKEN_PATH:-}" && ! -s "$RAY_AUTH_TOKEN_PATH" ]]; then
  echo "up.sh: RAY_AUTH_TOKEN_PATH=$RAY_AUTH_TOKEN_PATH is missing or empty: put the token" \
    "there, or unset RAY_AUTH_TOKEN_PATH to use (and create) ~/.ray/auth_token" >&2
  exit 1
fi
if ! ray get-auth-token >/dev/null 2>&1; then  # prints the token: never to the terminal
  (umask 077 && ray get-auth-token --generate >/dev/null 2>&1)
  echo "up.sh: created a Ray auth token in $HOME/.ray/auth_token (mode 0600)" >&2
fi
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
# Wait until both nodes are active (a job placed right away, e.g. STRICT_SPREAD, needs both).
for _ in $(seq 1 120); do
  nodes=$(ray status --address="127.0.0.1:$port" 2>/dev/null \
    | sed -n '/Active:/,/Pending:/p' | grep -c 'node_' || true)
  [[ "$nodes" -ge 2 ]] && break
  sleep 0.5
done
if [[ "${nodes:-0}" -lt 2 ]]; then
  echo "up.sh: the worker node did not join within 60 s (see $temp/session_latest/logs)" >&2
  exit 1
fi
echo "RAY_ADDRESS=http://127.0.0.1:$dash"

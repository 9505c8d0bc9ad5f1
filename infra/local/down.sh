#!/usr/bin/env bash
# Tear down the local cluster started by up.sh (same RAY_PORT / RAY_TEMP_DIR): exactly that
# cluster's processes, found by its temp dir and GCS port; no other Ray on this machine
# (`ray stop` would stop them all).
set -euo pipefail
port=${RAY_PORT:-6379}
temp=${RAY_TEMP_DIR:-/tmp/ray-gpthf-$port}
patterns=("$temp" "[0-9]:${port}( |$)")
signal() { for p in "${patterns[@]}"; do pkill "-$1" -f -- "$p" 2>/dev/null || true; done; }
alive() { for p in "${patterns[@]}"; do pgrep -f -- "$p" >/dev/null && return 0; done; return 1; }
signal TERM
for _ in $(seq 1 50); do
  alive || { echo "local Ray cluster on port $port stopped"; exit 0; }
  sleep 0.2
done
signal KILL
echo "local Ray cluster on port $port killed"

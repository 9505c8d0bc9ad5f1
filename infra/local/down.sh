#!/usr/bin/env bash
# Tear down the local cluster started by up.sh: the processes of the cluster whose GCS listens
# on RAY_PORT (6379), and no other Ray on this machine (`ray stop` would stop them all).
set -euo pipefail
port=${RAY_PORT:-6379}
pattern="127.0.0.1:${port}"
pkill -TERM -f -- "$pattern" 2>/dev/null || true
for _ in $(seq 1 50); do
  pgrep -f -- "$pattern" >/dev/null || { echo "local Ray cluster on port $port stopped"; exit 0; }
  sleep 0.2
done
pkill -KILL -f -- "$pattern" 2>/dev/null || true
echo "local Ray cluster on port $port killed"

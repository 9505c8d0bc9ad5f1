#!/usr/bin/env bash
# Tear down the local cluster started by up.sh (same RAY_PORT / RAY_TEMP_DIR): exactly that
# cluster's processes, found by its temp dir and GCS port; no other Ray on this machine
# (`ray stop` would stop them all). The temp dir must match as a whole path component:
# /tmp/ray-gpthf-6379 is not /tmp/ray-gpthf-63790, another cluster's.
set -euo pipefail
port=${RAY_PORT:-6379}
temp=${RAY_TEMP_DIR:-/tmp/ray-gpthf-$port}
temp=${temp%/}
[[ "$port" =~ ^[0-9]+$ ]] || { echo "down.sh: RAY_PORT=$port is not a port number" >&2; exit 2; }
[[ -n "$temp" ]] || { echo "down.sh: empty RAY_TEMP_DIR" >&2; exit 2; }
escaped=$(printf '%s' "$temp" | sed 's/[][\.*^$+?(){}|]/\\&/g')  # literal in an ERE
patterns=("(^|[ =])${escaped}(/| |$)" "[0-9]:${port}( |$)")
pids() { for p in "${patterns[@]}"; do pgrep -f -- "$p" || true; done | sort -u | grep -vx "$$" || true; }
signal() { local p; p=$(pids); [[ -z "$p" ]] || kill "-$1" $p 2>/dev/null || true; }
signal TERM
for _ in $(seq 1 50); do
  [[ -n "$(pids)" ]] || { echo "local Ray cluster on port $port stopped"; exit 0; }
  sleep 0.2
done
signal KILL
echo "local Ray cluster on port $port killed"

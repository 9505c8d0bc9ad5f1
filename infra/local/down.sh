#!/usr/bin/env bash
# Tear down the local cluster started by up.sh (same RAY_PORT / RAY_TEMP_DIR): exactly that
# cluster's processes, found by its temp dir and GCS port; no other Ray on this machine
# (`ray stop` would stop them all). The temp dir must match as a whole path component:
# /tmp/ray-gpthf-6379 is not /tmp/ray-gpthf-63790, another cluster's.
#
# A raylet that is being stopped may still start a worker, so one empty look is not enough:
# every look signals what it finds, and the cluster counts as stopped only after a second of
# consecutive empty looks.
set -euo pipefail
port=${RAY_PORT:-6379}
temp=${RAY_TEMP_DIR:-/tmp/ray-gpthf-$port}
temp=${temp%/}
[[ "$port" =~ ^[0-9]+$ ]] || { echo "down.sh: RAY_PORT=$port is not a port number" >&2; exit 2; }
[[ -n "$temp" ]] || { echo "down.sh: empty RAY_TEMP_DIR" >&2; exit 2; }
escaped=$(printf '%s' "$temp" | sed 's/[][\.*^$+?(){}|]/\\&/g')  # literal in an ERE
patterns=("(^|[ =])${escaped}(/| |$)" "[0-9]:${port}( |$)")
pids() { for p in "${patterns[@]}"; do pgrep -f -- "$p" || true; done | sort -u | grep -vx "$$" || true; }

# stop SIGNAL LOOKS: signal whatever is found, every 0.2 s, until 5 looks in a row find
# nothing (exit 0) or LOOKS run out (return 1).
stop() {
  local sig=$1 looks=$2 quiet=0 p
  for _ in $(seq 1 "$looks"); do
    p=$(pids)
    if [[ -z "$p" ]]; then
      quiet=$((quiet + 1))
      ((quiet < 5)) || return 0
    else
      quiet=0
      kill "-$sig" $p 2>/dev/null || true
    fi
    sleep 0.2
  done
  return 1
}
if stop TERM 75; then echo "local Ray cluster on port $port stopped"; exit 0; fi
if stop KILL 50; then echo "local Ray cluster on port $port killed"; exit 0; fi
echo "down.sh: processes of the cluster on port $port survived SIGKILL: $(pids | tr '\n' ' ')" >&2
exit 1

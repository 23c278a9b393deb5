#!/usr/bin/env bash
# Run a command with a private redis-server on a free loopback port; REDIS_URL points at it.
# The server is stopped when the command ends, whatever its exit status.
set -euo pipefail
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
dir=$(mktemp -d -t tolaria-redis-XXXXXX)
redis-server --port "$port" --bind 127.0.0.1 --save '' --appendonly no --dir "$dir" --daemonize no \
  >"$dir/redis.log" 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do
  redis-cli -p "$port" ping >/dev/null 2>&1 && break
  sleep 0.05
done
redis-cli -p "$port" ping >/dev/null || { echo "redis-server did not start; see $dir/redis.log"; cat "$dir/redis.log"; exit 1; }
export REDIS_URL="redis://127.0.0.1:$port/0"
"$@"

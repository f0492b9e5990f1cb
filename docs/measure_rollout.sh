#!/usr/bin/env bash
# Time a 2-worker rolling update under open-loop load, and count the requests that failed meanwhile.
#   bash docs/measure_rollout.sh            (from the repository root; sim engine, no GPU needed)
# It starts `mgpu up --engine sim --workers 2` (its own redis-server, in a temporary folder), runs
# `mgpu bench` at RATE req/s for DURATION s, and 8 s in rolls the workers with the default gate
# (canary 3, soak 5 s), drain-first, then prints the rollout, the bench summary and its error count.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RATE=${RATE:-40}
DURATION=${DURATION:-40}
tmp=$(mktemp -d /tmp/mgpu-rollout-XXXX)
port=$($PY -c 'from ops.procs import free_port; print(free_port())')
up_pid=""
cleanup() { [ -n "$up_pid" ] && kill -INT "$up_pid" 2>/dev/null && wait "$up_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
env -u MGPU_REDIS_URL $PY -m ops.cli up --engine sim --model sim --workers 2 --port "$port" --data-dir "$tmp/data" \
  > "$tmp/up.log" 2>&1 &
up_pid=$!
for _ in $(seq 120); do curl -sf "http://127.0.0.1:$port/ready" >/dev/null && break; sleep 0.5; done
redis_url=$(grep -o 'redis-server (AOF) on [^,]*' "$tmp/up.log" | awk '{print $4}')
export MGPU_REDIS_URL=$redis_url
echo "date: $(date -u +%FT%TZ)   host: $(nproc) cores, $(uname -m), no GPU   engine: sim (decode 10 ms/step)"
$PY -m ops.cli bench --url "http://127.0.0.1:$port" --model sim --endpoint chat --rate "$RATE" \
  --duration "$DURATION" --max-tokens 32 --timeout 60 --json "$tmp/bench.json" > "$tmp/bench.out" 2>&1 &
bench_pid=$!
sleep 8  # let the load settle before rolling
rc=0
$PY -m ops.cli rollout --set sim_decode_ms=8 --set revision=v2 --wait > "$tmp/rollout.out" || rc=$?
echo "mgpu rollout --wait: exit code $rc"
$PY -m ops.cli rollout --status --json > "$tmp/rollout.json"
wait "$bench_pid"
$PY - "$tmp/rollout.json" "$tmp/bench.json" <<'EOF'
import json, sys
ro = json.load(open(sys.argv[1]))
print(f"rollout {ro['id']}: {ro['phase']}, {ro['from_revision']} -> {ro['to_revision']}, "
      f"{ro['finished_at'] - ro['started_at']:.1f} s from taken to done")
for p in ro["slots"]:
    print(f"  {p['slot']} {p['worker']}: {p['phase']} ({p['detail']})")
r = json.load(open(sys.argv[2]))["results"][0]
lat = r["latency_ms"]
print(f"bench (the whole {r['window_s']:.0f} s, rollout included): offered {r['offered']}, sent {r['sent']}, "
      f"ok {r['ok']}, failed {sum(r['errors'].values())} {r['errors'] or ''}; "
      f"latency p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, max {lat['max']:.0f} ms")
EOF

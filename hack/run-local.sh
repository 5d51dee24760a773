#!/usr/bin/env bash
# The local stack on loopback: redis-server, clamd with the test signatures, and the consumer.
# Everything lives in ./.run; Ctrl-C stops what this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run=$root/.run
target=${CARGO_TARGET_DIR:-$root/target}/release
mkdir -p "$run"/db "$run"/tmp "$run"/scan "$run"/log

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
REDIS_PORT=${REDIS_PORT:-$(free_port)}
CLAMD_PORT=${CLAMD_PORT:-$(free_port)}
METRICS_PORT=${METRICS_PORT:-$(free_port)}

pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

wait_port() {
  for _ in $(seq 1 600); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "nothing listens on port $1; see $run/log" >&2
  exit 1
}

hack/build-test-db.sh "$run/db" 1000
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no \
  --dir "$run" --logfile "$run/log/redis.log" &
pids+=($!)
cat >"$run/clamd.conf" <<CONF
Foreground yes
TCPSocket $CLAMD_PORT
TCPAddr 127.0.0.1
DatabaseDirectory $run/db
TemporaryDirectory $run/tmp
LogFile $run/log/clamd.log
StreamMaxLength 120M
MaxFileSize 100M
MaxScanSize 400M
AlertExceedsMax yes
CONF
clamd -c "$run/clamd.conf" >/dev/null 2>&1 &
pids+=($!)
wait_port "$REDIS_PORT"
wait_port "$CLAMD_PORT"

"$target/virus-scanner-handler" --redis-host 127.0.0.1 --redis-port "$REDIS_PORT" \
  --clamd-address "127.0.0.1:$CLAMD_PORT" --scan-tmp-dir "$run/scan" \
  --metrics-addr "127.0.0.1:$METRICS_PORT" --log-format text 2>"$run/log/handler.log" &
pids+=($!)
wait_port "$METRICS_PORT"

eicar='X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*'
cat <<MSG

virus-scanner local stack is up (logs in .run/log):
  redis    127.0.0.1:$REDIS_PORT
  clamd    127.0.0.1:$CLAMD_PORT
  consumer http://127.0.0.1:$METRICS_PORT/metrics

Scan a body through the queue (seed task format) and read the verdict:
  redis-cli -p $REDIS_PORT LPUSH scan_queue "demo-1|BODY|\$(date +%s%N)|"'$eicar'
  redis-cli -p $REDIS_PORT BLPOP scan_result:demo-1 5
  redis-cli -p $REDIS_PORT LPUSH scan_queue "demo-2|BODY|\$(date +%s%N)|hello"
  redis-cli -p $REDIS_PORT BLPOP scan_result:demo-2 5

Ctrl-C stops the stack.
MSG
wait -n "${pids[@]}"
echo "a component stopped; see $run/log" >&2

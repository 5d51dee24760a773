#!/usr/bin/env bash
# The local stack on loopback: Envoy (ext_proc) -> producer -> Redis -> consumer -> clamd
# with the test signatures, in front of a small upstream. Everything lives in ./.run;
# Ctrl-C stops what this script started. MODE=FULL_DUPLEX_STREAMED switches the body mode.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
run=$root/.run
target=${CARGO_TARGET_DIR:-$root/target}/release
mkdir -p "$run"/db "$run"/tmp "$run"/scan "$run"/log "$run"/files
envoy=${ENVOY_BIN:-${VIRUS_SCANNER_CACHE:-$HOME/.cache/virus-scanner}/envoy-venv/bin/envoy}
MODE=${MODE:-BUFFERED}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
REDIS_PORT=${REDIS_PORT:-$(free_port)}
CLAMD_PORT=${CLAMD_PORT:-$(free_port)}
METRICS_PORT=${METRICS_PORT:-$(free_port)}
GRPC_PORT=${GRPC_PORT:-$(free_port)}
PRODUCER_HTTP_PORT=${PRODUCER_HTTP_PORT:-$(free_port)}
ICAP_PORT=${ICAP_PORT:-$(free_port)}
UPSTREAM_PORT=${UPSTREAM_PORT:-$(free_port)}
ENVOY_PORT=${ENVOY_PORT:-8000}
ENVOY_ADMIN_PORT=${ENVOY_ADMIN_PORT:-$(free_port)}

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

"$target/virus-scanner-producer" --redis-host 127.0.0.1 --redis-port "$REDIS_PORT" \
  --grpc-addr "127.0.0.1:$GRPC_PORT" --http-addr "127.0.0.1:$PRODUCER_HTTP_PORT" \
  --icap-addr "127.0.0.1:$ICAP_PORT" \
  --scan-tmp-dir "$run/scan" --log-format text 2>"$run/log/producer.log" &
pids+=($!)

printf '%s' 'X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*' >"$run/files/eicar.com"
echo "a harmless file" >"$run/files/clean.txt"
python3 hack/upstream.py "$UPSTREAM_PORT" "$run/files" 2>"$run/log/upstream.log" &
pids+=($!)

if [ "$MODE" = FULL_DUPLEX_STREAMED ]; then trailers=SEND; limit=1048576; else trailers=SKIP; limit=67108864; fi
sed -e "s|\${LISTEN_PORT}|$ENVOY_PORT|; s|\${ADMIN_PORT}|$ENVOY_ADMIN_PORT|" \
    -e "s|\${UPSTREAM_PORT}|$UPSTREAM_PORT|; s|\${BUFFER_LIMIT}|$limit|g" \
    -e "s|\${PROCESSOR_ADDRESS}|socket_address: { address: 127.0.0.1, port_value: $GRPC_PORT }|" \
    -e "s|\${BODY_MODE}|$MODE|g; s|\${TRAILER_MODE}|$trailers|g; s|\${MESSAGE_TIMEOUT}|30s|g" \
    -e "s|\${ACCESS_LOG}|$run/log/access.log|" \
    hack/envoy.yaml.in >"$run/envoy.yaml"
"$envoy" -c "$run/envoy.yaml" --disable-hot-restart --concurrency 2 -l warning \
  --log-path "$run/log/envoy.log" >/dev/null 2>&1 &
pids+=($!)
wait_port "$PRODUCER_HTTP_PORT"
wait_port "$UPSTREAM_PORT"
wait_port "$ENVOY_PORT"

url=http://127.0.0.1:$ENVOY_PORT
cat <<MSG

virus-scanner local stack is up ($MODE; logs in .run/log):
  envoy     $url  (admin 127.0.0.1:$ENVOY_ADMIN_PORT)
  producer  ext_proc 127.0.0.1:$GRPC_PORT, ICAP icap://127.0.0.1:$ICAP_PORT/avscan,
            metrics http://127.0.0.1:$PRODUCER_HTTP_PORT/metrics
  consumer  metrics http://127.0.0.1:$METRICS_PORT/metrics
  redis     127.0.0.1:$REDIS_PORT    clamd 127.0.0.1:$CLAMD_PORT

Try it:
  curl -i -X POST --data-binary 'hello world' $url/upload             # 200
  curl -i -X POST --data-binary @.run/files/eicar.com $url/upload     # 406, X-Virus-Infected
  curl -i $url/files/eicar.com                                         # 406 (download)
  curl -i $url/safe/files/eicar.com                                    # 200 (route opted out)
  c-icap-client -i 127.0.0.1 -p $ICAP_PORT -s avscan -f .run/files/eicar.com -v   # ICAP: 403 page

Ctrl-C stops the stack.
MSG
wait -n "${pids[@]}"
echo "a component stopped; see $run/log" >&2

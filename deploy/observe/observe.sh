#!/usr/bin/env bash
# `make observe`: Sluice, Jaeger v2 and Prometheus as plain processes beside a Kafka broker, no
# containers. Jaeger reads Sluice's traces topic with its own Kafka receiver; Prometheus scrapes
# Sluice's /metrics with deploy/prometheus/rules.yml loaded.
#
#   deploy/observe/observe.sh up      build/install what is missing, start all three, wait until ready
#   deploy/observe/observe.sh down    stop what `up` started (Kafka is never stopped here)
#   deploy/observe/observe.sh status
#
# Settings (environment): SLUICE_KAFKA_BOOTSTRAP (default: the local broker of deploy/kafka/kafka.sh,
# started if it is not running), every SLUICE_* option of the service, OBSERVE_DIR (logs, pids,
# generated config; default build/observe), JAEGER_UI_PORT (36686), PROMETHEUS_PORT (39090),
# SLUICE_HTTP_PORT (39464), OBSERVE_READY_TIMEOUT_S (300: the first run builds Jaeger), JAEGER_UI_ASSETS
# (default: the newest UI deploy/observe/build-jaeger-ui.sh built; none: Jaeger's placeholder page).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
DIR=${OBSERVE_DIR:-$ROOT/build/observe}
PY=${PYTHON:-$ROOT/.venv/bin/python}
JAEGER_UI_PORT=${JAEGER_UI_PORT:-36686}
PROMETHEUS_PORT=${PROMETHEUS_PORT:-39090}
export SLUICE_HTTP_HOST=${SLUICE_HTTP_HOST:-127.0.0.1}
export SLUICE_HTTP_PORT=${SLUICE_HTTP_PORT:-39464}
export SLUICE_TRACES_TOPIC=${SLUICE_TRACES_TOPIC:-sluice.traces}
TIMEOUT=${OBSERVE_READY_TIMEOUT_S:-300}
COMPONENTS=(sluice jaeger prometheus)

main() {
  case "${1:-}" in
    up) up ;;
    down) down ;;
    status) status ;;
    *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
  esac
}

up() {
  mkdir -p "$DIR"
  local jaeger
  jaeger=$("$ROOT/deploy/observe/build-jaeger.sh")
  "$ROOT/deploy/observe/install-prometheus.sh"
  if [ -z "${SLUICE_KAFKA_BOOTSTRAP:-}" ]; then
    # A broker already on the port (this checkout's, or another's) is used as it is.
    (: </dev/tcp/127.0.0.1/"${KAFKA_PORT:-19092}") 2>/dev/null || "$ROOT/deploy/kafka/kafka.sh" start
    SLUICE_KAFKA_BOOTSTRAP=127.0.0.1:${KAFKA_PORT:-19092}
  fi
  export SLUICE_KAFKA_BOOTSTRAP
  trap 'echo "observe: start-up failed, stopping what started (logs in $DIR)" >&2; down' ERR
  # Sluice first: it creates the traces topic that Jaeger's receiver subscribes to.
  start sluice "$PY" -m service
  wait_http sluice "http://$SLUICE_HTTP_HOST:$SLUICE_HTTP_PORT/readyz"
  JAEGER_KAFKA_BROKERS=$SLUICE_KAFKA_BOOTSTRAP \
    JAEGER_KAFKA_GROUP=${JAEGER_KAFKA_GROUP:-jaeger-$SLUICE_TRACES_TOPIC} \
    JAEGER_QUERY_HTTP=127.0.0.1:$JAEGER_UI_PORT \
    JAEGER_QUERY_GRPC=127.0.0.1:${JAEGER_GRPC_PORT:-$((JAEGER_UI_PORT - 1))} \
    JAEGER_HEALTH_HTTP=127.0.0.1:${JAEGER_HEALTH_PORT:-$((JAEGER_UI_PORT + 1))} \
    JAEGER_UI_ASSETS=${JAEGER_UI_ASSETS:-$(ui_assets)} \
    start jaeger "$jaeger" --config "$ROOT/deploy/jaeger/config.yaml"
  write_prometheus_config
  start prometheus prometheus --config.file="$DIR/prometheus.yml" \
    --web.listen-address="127.0.0.1:$PROMETHEUS_PORT" --storage.tsdb.path="$DIR/prometheus-data"
  wait_http jaeger "http://127.0.0.1:$JAEGER_UI_PORT/api/services"
  wait_http prometheus "http://127.0.0.1:$PROMETHEUS_PORT/-/ready"
  trap - ERR
  echo "Jaeger UI   http://127.0.0.1:$JAEGER_UI_PORT (service ${SLUICE_SERVICE_NAME:-sluice})"
  echo "Prometheus  http://127.0.0.1:$PROMETHEUS_PORT (rules: deploy/prometheus/rules.yml)"
  echo "Sluice      http://$SLUICE_HTTP_HOST:$SLUICE_HTTP_PORT/metrics, Kafka $SLUICE_KAFKA_BOOTSTRAP"
}

# Jaeger's UI where deploy/observe/build-jaeger-ui.sh built it; otherwise Jaeger's placeholder page.
ui_assets() {
  local built
  built=$(ls -d "$ROOT"/build/jaeger-ui/v*/ 2>/dev/null | sort -V | tail -1)
  [ -n "$built" ] && [ -f "$built/index.html" ] && echo "${built%/}"
  return 0
}

# Prometheus reads no environment in its config: written here, with the rules file's full path.
write_prometheus_config() {
  local targets=${SLUICE_METRICS_TARGETS:-$SLUICE_HTTP_HOST:$SLUICE_HTTP_PORT}
  cat >"$DIR/prometheus.yml" <<EOF
global:
  scrape_interval: ${PROMETHEUS_SCRAPE_INTERVAL:-5s}
  evaluation_interval: ${PROMETHEUS_SCRAPE_INTERVAL:-5s}
rule_files: ["$ROOT/deploy/prometheus/rules.yml"]
scrape_configs:
  - job_name: sluice
    metrics_path: /metrics
    static_configs:
      - targets: [$(sed 's/[^,]\+/"&"/g' <<<"$targets")]
EOF
}

start() {
  local name=$1
  shift
  if running "$name"; then echo "observe: $name already runs (pid $(cat "$DIR/$name.pid"))"; return; fi
  setsid "$@" >"$DIR/$name.log" 2>&1 </dev/null &
  echo $! >"$DIR/$name.pid"
}

wait_http() {
  local name=$1 url=$2 deadline=$((SECONDS + TIMEOUT))
  until curl -sf -o /dev/null "$url"; do
    if ! running "$name"; then echo "observe: $name exited; its log:" >&2; tail -30 "$DIR/$name.log" >&2; return 1; fi
    if [ $SECONDS -ge $deadline ]; then echo "observe: $name not ready at $url in ${TIMEOUT}s" >&2; return 1; fi
    sleep 0.5
  done
}

# Each component runs in a session of its own (setsid): its whole process group is signalled.
down() {
  local name pid i
  for ((i = ${#COMPONENTS[@]} - 1; i >= 0; i--)); do
    name=${COMPONENTS[i]}
    running "$name" || { rm -f "$DIR/$name.pid"; continue; }
    pid=$(cat "$DIR/$name.pid")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq "$(grace_halfseconds "$name")"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
    rm -f "$DIR/$name.pid"
    echo "observe: stopped $name"
  done
}

# Sluice gets its drain time to finish in-flight jobs; Jaeger's storage is in memory, lost on stop
# anyway, and its Kafka receiver takes ~12 s to leave its group: it gets 2 s.
grace_halfseconds() {
  case $1 in
    sluice) local drain=${SLUICE_DRAIN_TIMEOUT_S:-30}; echo $((2 * ${drain%%.*} + 10)) ;;
    jaeger) echo 4 ;;
    *) echo 20 ;;
  esac
}

status() {
  local name rc=0
  for name in "${COMPONENTS[@]}"; do
    if running "$name"; then echo "$name: running (pid $(cat "$DIR/$name.pid"))"; else echo "$name: stopped"; rc=3; fi
  done
  return $rc
}

running() {
  [ -f "$DIR/$1.pid" ] && kill -0 "$(cat "$DIR/$1.pid")" 2>/dev/null
}

main "$@"

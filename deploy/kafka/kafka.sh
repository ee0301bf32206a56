#!/usr/bin/env bash
# A local single-node Apache Kafka broker (KRaft, broker + controller in one JVM) on 127.0.0.1.
#
#   kafka.sh fetch    gather the broker's jars from Maven Central (once per version)
#   kafka.sh start    fetch, format storage if new, start, wait until the broker answers;
#                     already running: do nothing. Exit 0 = started or running.
#   kafka.sh stop     stop the broker this script started (SIGTERM, then SIGKILL after 30 s)
#   kafka.sh status   exit 0 if our broker is running and its port answers
#   kafka.sh logs     tail the broker's log
#
# Environment: KAFKA_VERSION (default: the pom's pin), KAFKA_PORT (19092),
# KAFKA_CONTROLLER_PORT (19093), SLUICE_BUILD_DIR (<repo>/build), KAFKA_HEAP (512m),
# KAFKA_START_TIMEOUT (60 seconds).
#
# One node of a cluster (loadtest/chaos_brokers.py starts three): KAFKA_NODE_ID (1),
# KAFKA_QUORUM_VOTERS (id@host:controller-port,...; default: this node alone), KAFKA_CLUSTER_ID
# (the same for every node; default: a new one when the storage is formatted), KAFKA_REPLICATION
# (replicas of the internal topics and of auto-created ones; 1) and KAFKA_MIN_ISR
# (min.insync.replicas, of the transaction log too; 1). Every node of a cluster is started at
# once: a node waits for a quorum of controllers before it says it has started.
#
# KAFKA_SECURITY picks the client listener: plaintext (default), sasl_plaintext, sasl_ssl or ssl.
# With SASL the broker accepts PLAIN, SCRAM-SHA-256 and SCRAM-SHA-512 for one user,
# KAFKA_SASL_USERNAME (sluice) / KAFKA_SASL_PASSWORD (sluice-secret); SCRAM users are written when
# the storage is formatted, so a SASL broker keeps its data in a folder of its own. With sasl_ssl
# or ssl (TLS without SASL) the broker's self-signed certificate (keytool, for 127.0.0.1 and
# localhost) is in tls-PORT/ca.pem.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
build=${SLUICE_BUILD_DIR:-$repo/build}
pinned=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/pom.xml")
version=${KAFKA_VERSION:-$pinned}
port=${KAFKA_PORT:-19092}
controller_port=${KAFKA_CONTROLLER_PORT:-19093}
heap=${KAFKA_HEAP:-512m}
timeout=${KAFKA_START_TIMEOUT:-60}
security=${KAFKA_SECURITY:-plaintext}
node_id=${KAFKA_NODE_ID:-1}
voters=${KAFKA_QUORUM_VOTERS:-$node_id@127.0.0.1:$controller_port}
cluster_id=${KAFKA_CLUSTER_ID:-}
replication=${KAFKA_REPLICATION:-1}
min_isr=${KAFKA_MIN_ISR:-1}
sasl_user=${KAFKA_SASL_USERNAME:-sluice}
sasl_password=${KAFKA_SASL_PASSWORD:-sluice-secret}
case "$security" in
  plaintext|sasl_plaintext|sasl_ssl|ssl) ;;
  *) echo "kafka: ERROR: KAFKA_SECURITY=$security: use plaintext, sasl_plaintext, sasl_ssl or ssl" >&2; exit 2 ;;
esac
listener=${security^^}

home=$build/kafka
libs=$home/libs-$version
data=$home/data-$version-$port
[ "$security" = plaintext ] || data+="-$security"  # SCRAM users live in the data
tls=$home/tls-$port
logs=$home/logs
pidfile=$home/broker-$port.pid
props=$home/server-$port.properties

say() { echo "kafka: $*" >&2; }
die() { say "ERROR: $*"; exit 1; }

port_answers() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

our_pid() {
  # The pid in our pid file, if that process is still our broker (pids get reused).
  [ -f "$pidfile" ] || return 1
  local pid; pid=$(cat "$pidfile")
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$props" || return 1
  echo "$pid"
}

require_tools() {
  command -v java >/dev/null || die "java not found: Kafka $version needs a JDK 17 or newer on PATH"
  local major
  major=$(java -XshowSettings:properties -version 2>&1 | sed -n 's/ *java.specification.version = //p')
  [ "${major%%.*}" -ge 17 ] 2>/dev/null || die "Kafka $version needs Java 17+, found Java $major"
}

fetch() {
  [ -f "$libs/.complete" ] && return 0
  command -v mvn >/dev/null || die "mvn not found: Maven is needed once to fetch the Kafka broker's jars"
  say "fetching Apache Kafka $version from Maven Central into $libs"
  rm -rf "$libs.tmp"
  mvn -q -B -Dstyle.color=never -f "$here/pom.xml" dependency:copy-dependencies \
      -Dkafka.version="$version" -DincludeScope=runtime -DoutputDirectory="$libs.tmp" \
    || die "Maven could not fetch org.apache.kafka:kafka_2.13:$version (output above)"
  touch "$libs.tmp/.complete"
  rm -rf "$libs" && mv "$libs.tmp" "$libs"
}

write_config() {
  mkdir -p "$data" "$logs"
  local -a subst=(-e "s|@PORT@|$port|g" -e "s|@CONTROLLER_PORT@|$controller_port|g" -e "s|@DATA_DIR@|$data|g"
    -e "s|@LISTENER@|$listener|g" -e "s|@LISTENER_LC@|$security|g" -e "s|@USER@|$sasl_user|g"
    -e "s|@PASSWORD@|$sasl_password|g" -e "s|@BROKER_PASSWORD@|broker-$port|g"
    -e "s|@TLS_DIR@|$tls|g" -e "s|@STORE_PASSWORD@|sluice-$port|g" -e "s|@NODE_ID@|$node_id|g"
    -e "s|@VOTERS@|$voters|g" -e "s|@REPLICATION@|$replication|g" -e "s|@MIN_ISR@|$min_isr|g")
  sed "${subst[@]}" "$here/server.properties.in" >"$props"
  case "$security" in sasl_*) sed "${subst[@]}" "$here/sasl.properties.in" >>"$props" ;; esac
  case "$security" in *ssl) make_certificate; sed "${subst[@]}" "$here/tls.properties.in" >>"$props" ;; esac
}

make_certificate() {
  # Self-signed, marked as a CA so that clients may use it as their trust anchor (ca.pem).
  [ -f "$tls/ca.pem" ] && return 0
  command -v keytool >/dev/null || die "keytool not found: KAFKA_SECURITY=$security needs the JDK's keytool"
  rm -rf "$tls" && mkdir -p "$tls"
  local pass="sluice-$port"
  keytool -genkeypair -alias broker -keyalg RSA -keysize 2048 -validity 3650 -dname "CN=localhost" \
    -ext "SAN=ip:127.0.0.1,dns:localhost" -ext "bc:c" -keystore "$tls/broker.p12" -storetype PKCS12 \
    -storepass "$pass" -keypass "$pass" >/dev/null 2>&1 || die "keytool could not create the broker's key"
  keytool -exportcert -rfc -alias broker -keystore "$tls/broker.p12" -storepass "$pass" \
    -file "$tls/ca.pem" >/dev/null 2>&1 || die "keytool could not export the broker's certificate"
  keytool -importcert -noprompt -alias broker -file "$tls/ca.pem" -keystore "$tls/trust.p12" \
    -storetype PKCS12 -storepass "$pass" >/dev/null 2>&1 || die "keytool could not write the trust store"
}

kafka_java() {
  # exec: callers run this in a subshell, so the broker's pid is the subshell's pid.
  exec java -Xms128m -Xmx"$heap" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dkafka.logs.dir="$logs" -Dlog4j2.configurationFile="file:$here/log4j2.properties" \
    -cp "$libs/*" "$@"
}

format_storage() {
  [ -f "$data/meta.properties" ] && return 0
  [ -n "$cluster_id" ] || cluster_id=$(kafka_java kafka.tools.StorageTool random-uuid)
  local -a scram=()
  if [[ "$security" == sasl_* ]]; then
    for mechanism in SCRAM-SHA-256 SCRAM-SHA-512; do
      scram+=(--add-scram "$mechanism=[name=$sasl_user,password=$sasl_password]")
    done
  fi
  (kafka_java kafka.tools.StorageTool format -t "$cluster_id" -c "$props" --ignore-formatted "${scram[@]}" \
    >/dev/null) || die "formatting KRaft storage in $data failed"
}

log_tail() {
  local f
  for f in "$logs/server.log" "$logs/stdout.log"; do
    [ -s "$f" ] || continue
    if grep -qE "ERROR|FATAL|Caused by" "$f"; then
      echo "----- errors in $f -----"; grep -E "ERROR|FATAL|Caused by" "$f" | tail -n 10
    fi
    echo "----- last lines of $f -----"; tail -n 25 "$f"
  done >&2
  return 0
}

start() {
  if pid=$(our_pid) && port_answers "$port"; then
    say "already running (pid $pid) on 127.0.0.1:$port"; return 0
  fi
  port_answers "$port" && die "127.0.0.1:$port is in use by a process this script did not start; set KAFKA_PORT"
  require_tools
  fetch
  write_config
  format_storage
  for f in server.log stdout.log; do [ -f "$logs/$f" ] && mv "$logs/$f" "$logs/$f.prev"; done
  # setsid: a Ctrl-C meant for the service (make run) must not reach the broker.
  (setsid bash -c "$(declare -f kafka_java); $(declare -p heap logs here libs); kafka_java kafka.Kafka '$props'" \
    >"$logs/stdout.log" 2>&1 </dev/null &
   echo $! >"$pidfile")
  local pid; pid=$(cat "$pidfile")
  local deadline=$((SECONDS + timeout))
  until port_answers "$port" && grep -q "Kafka Server started" "$logs/server.log" 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      log_tail; rm -f "$pidfile"; die "the broker exited during start-up (log tail above)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      log_tail; kill -9 "$pid" 2>/dev/null || true; rm -f "$pidfile"
      die "the broker did not come up within ${timeout}s (log tail above)"
    fi
    sleep 0.5
  done
  say "Apache Kafka $version running (pid $pid) on 127.0.0.1:$port ($listener), data in $data"
  if [[ "$security" == *ssl ]]; then say "clients trust the broker's certificate with $tls/ca.pem"; fi
}

stop() {
  local pid
  if ! pid=$(our_pid); then rm -f "$pidfile"; say "not running"; return 0; fi
  kill -TERM "$pid"
  for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
  if kill -0 "$pid" 2>/dev/null; then
    say "broker did not stop within 30 s; killing it"; kill -KILL "$pid" || true
  fi
  rm -f "$pidfile"
  say "stopped (pid $pid)"
}

status() {
  if pid=$(our_pid) && port_answers "$port"; then say "running (pid $pid) on 127.0.0.1:$port"; return 0; fi
  say "not running"; return 1
}

case "${1:-}" in
  fetch) require_tools; fetch ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  logs) tail -n "${2:-100}" "$logs/server.log" ;;
  *) echo "usage: $0 fetch|start|stop|status|logs [N]" >&2; exit 2 ;;
esac

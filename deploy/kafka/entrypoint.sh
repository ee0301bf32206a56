#!/bin/sh
# The Kafka image's start: write the single-node KRaft config from the environment, format the
# storage the first time, then run the broker in the foreground.
set -eu
host=${KAFKA_ADVERTISED_HOST:-$(hostname)}
port=${KAFKA_PORT:-9092}
controller=${KAFKA_CONTROLLER_PORT:-9093}
host_port=${KAFKA_HOST_PORT:-9094}
data=/var/lib/kafka/data
props=/var/lib/kafka/server.properties
cat >"$props" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$controller
listeners=PLAINTEXT://:$port,HOST://:$host_port,CONTROLLER://127.0.0.1:$controller
advertised.listeners=PLAINTEXT://$host:$port,HOST://localhost:$host_port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,HOST:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$data
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=8
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
PROPS
kafka() {
  java -Xms128m -Xmx"${KAFKA_HEAP:-512m}" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dkafka.logs.dir=/var/lib/kafka/logs -Dlog4j2.configurationFile=file:/opt/kafka/config/log4j2.properties \
    -cp '/opt/kafka/libs/*' "$@"
}
if [ ! -f "$data/meta.properties" ]; then
  kafka kafka.tools.StorageTool format -t "$(kafka kafka.tools.StorageTool random-uuid)" -c "$props" >/dev/null
fi
kafka kafka.Kafka "$props" &
pid=$!
trap 'kill -TERM $pid' TERM INT
wait $pid || wait $pid

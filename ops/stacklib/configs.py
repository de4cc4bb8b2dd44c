"""The services' configuration files: Kafka's server.properties and log4j2.properties, and
redis.conf."""

from __future__ import annotations

import shutil

from stacklib.common import HOST
from stacklib.layout import Service, Stack


def kafka_properties(stack: Stack, service: Service) -> str:
    brokers = stack.kafka
    if len(brokers) == 1:
        quorum = f"controller.quorum.bootstrap.servers={HOST}:{service.peer_port}"
    else:
        voters = ",".join(f"{b.index}@{HOST}:{b.peer_port}" for b in brokers)
        quorum = f"controller.quorum.voters={voters}"
    rf, isr = stack.replication_factor, stack.min_isr
    return f"""\
process.roles=broker,controller
node.id={service.index}
{quorum}
listeners=PLAINTEXT://{HOST}:{service.port},CONTROLLER://{HOST}:{service.peer_port}
advertised.listeners=PLAINTEXT://{HOST}:{service.port}
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
log.dirs={service.home / "data"}
num.partitions={stack.shape.partitions}
auto.create.topics.enable=false
default.replication.factor={rf}
min.insync.replicas={isr}
offsets.topic.replication.factor={rf}
offsets.topic.num.partitions=12
transaction.state.log.replication.factor={rf}
transaction.state.log.min.isr={isr}
transaction.state.log.num.partitions=12
transaction.abort.timed.out.transaction.cleanup.interval.ms=5000
share.coordinator.state.topic.replication.factor={rf}
share.coordinator.state.topic.min.isr={isr}
group.initial.rebalance.delay.ms=0
broker.heartbeat.interval.ms=500
broker.session.timeout.ms=4000
replica.lag.time.max.ms=10000
num.network.threads=2
num.io.threads=4
"""


def kafka_log4j(service: Service) -> str:
    return f"""\
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = {service.home / "server.log"}
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.request.name = kafka.request.logger
logger.request.level = warn
"""


def redis_conf(stack: Stack, service: Service) -> str:
    lines = [
        f"bind {HOST}",
        f"port {service.port}",
        "protected-mode yes",
        "daemonize no",
        f"dir {service.home / 'data'}",
        f"logfile {service.home / 'redis.log'}",
        "appendonly yes",
        f"appendfsync {stack.shape.fsync}",
        'save ""',
    ]
    if stack.shape.redis_cluster:
        lines += [
            "cluster-enabled yes",
            f"cluster-port {service.peer_port}",
            f"cluster-config-file {service.home / 'nodes.conf'}",
            "cluster-node-timeout 5000",
        ]
    return "\n".join(lines) + "\n"


def prepare_fresh(stack: Stack) -> None:
    """Lay out config files and empty data folders for a stack that is not set up yet."""
    for old in [*stack.dir.glob("kafka-*"), *stack.dir.glob("redis-*")]:
        shutil.rmtree(old)
    for service in stack.services:
        (service.home / "data").mkdir(parents=True)
        if service.kind == "kafka":
            service.config.write_text(kafka_properties(stack, service))
            (service.home / "log4j2.properties").write_text(kafka_log4j(service))
        else:
            service.config.write_text(redis_conf(stack, service))
    stack.save()

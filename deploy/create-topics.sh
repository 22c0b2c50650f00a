#!/usr/bin/env bash
# Creates the Kafka topics MamoActors uses. Idempotent (--if-not-exists): run it again after a change of settings
# and existing topics are left as they are. Runs in the apache/kafka image (docker-compose.yml: kafka-init).
#
#   mamo.pairs       image-text pairs in; the trainers' consumer group splits its partitions
#   mamo.pairs.dlq   dead letters: pairs that could not be used, with the reason
#   mamo.embeddings       image embeddings out, keyed by item id; compacted, so the newest vector of each id is kept
#   mamo.text-embeddings  text embeddings out, the same way
#   mamo.embeddings.versions, mamo.text-embeddings.versions
#                         each model version's events (started, complete, abandoned; docs/KAFKA.md): one partition, in order
set -euo pipefail

BOOTSTRAP="${BOOTSTRAP:-kafka:9092}"
REPLICATION_FACTOR="${REPLICATION_FACTOR:-1}"
PAIRS_PARTITIONS="${PAIRS_PARTITIONS:-4}"
DLQ_PARTITIONS="${DLQ_PARTITIONS:-1}"
EMBEDDINGS_PARTITIONS="${EMBEDDINGS_PARTITIONS:-4}"
KAFKA_BIN="${KAFKA_BIN:-/opt/kafka/bin}"
ATTEMPTS="${ATTEMPTS:-10}"

# The broker can report healthy a moment before it accepts admin requests: retry each creation a few times.
create() {
    local topic="$1"; shift
    local attempt
    for attempt in $(seq 1 "$ATTEMPTS"); do
        if "$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --create --if-not-exists \
            --topic "$topic" --replication-factor "$REPLICATION_FACTOR" "$@"; then
            return 0
        fi
        echo "create-topics: $topic not created (attempt $attempt of $ATTEMPTS), retrying in 3 s" >&2
        sleep 3
    done
    echo "create-topics: giving up on $topic" >&2
    return 1
}

create mamo.pairs --partitions "$PAIRS_PARTITIONS"
create mamo.pairs.dlq --partitions "$DLQ_PARTITIONS"
create mamo.embeddings --partitions "$EMBEDDINGS_PARTITIONS" --config cleanup.policy=compact
create mamo.text-embeddings --partitions "$EMBEDDINGS_PARTITIONS" --config cleanup.policy=compact
create mamo.embeddings.versions --partitions 1 --config cleanup.policy=compact
create mamo.text-embeddings.versions --partitions 1 --config cleanup.policy=compact

# --topic takes one name or a regular expression (except with --create).
"$KAFKA_BIN/kafka-topics.sh" --bootstrap-server "$BOOTSTRAP" --describe --topic 'mamo\..*'

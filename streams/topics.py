"""The project's Kafka topics and their registry subjects, created idempotently.

`ensure_topics(settings)` is safe to call any number of times (the stack calls it on `ugt stack up`,
the publish CLI before publishing): it creates what is missing and leaves existing topics alone.
Replication follows the profile (Settings.topic_replication: 1 on the single node, 3 with min.insync.replicas=2
in the cluster profile; min(3, brokers) on a bootstrap that reaches more brokers) and refuses to create topics
with fewer replicas than the profile wants. `ensure_subjects(settings)` registers each topic's schema under
`<topic>-value` with the compatibility rule of schemas/history/compatibility.json, so the registry refuses exactly the
changes tests/test_schema_compat.py forbids.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import requests
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from infra.settings import Settings, get_settings
from streams.serde import SCHEMA_DIR, RegistryError, SchemaRegistryClient, schema_text, subject_for

log = logging.getLogger(__name__)

DEFAULT_PARTITIONS = 4  # 2 cores x 2: room for Flink parallelism 2-4 without repartitioning


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int = DEFAULT_PARTITIONS
    config: dict[str, str] = field(default_factory=dict)


class TopicError(RuntimeError):
    """Kafka refused to create a topic or could not be reached."""


def topic_specs(settings: Settings) -> list[TopicSpec]:
    """Every topic of the pipeline with its partitions and configuration."""
    t = settings.topics
    return [
        TopicSpec(t.raw),
        # the catalog is keyed by item id: compaction keeps the latest version of every item forever
        TopicSpec(t.items, 2, {"cleanup.policy": "compact"}),
        TopicSpec(t.tokens),
        TopicSpec(t.dlq, 1),
        TopicSpec(t.impressions),  # keyed by user id, like the user events they are joined with
        TopicSpec(t.experiment_metrics, 1),  # JSON rows of the feedback_join job, keyed "<experiment>:<arm>"
    ]


def planned_topics(settings: Settings, extra: Iterable[TopicSpec | str] = ()) -> list[TopicSpec]:
    """The pipeline's topics plus `extra`, once each; a pipeline topic named again keeps its own spec."""
    specs: dict[str, TopicSpec] = {}
    for spec in topic_specs(settings) + [TopicSpec(x) if isinstance(x, str) else x for x in extra]:
        specs.setdefault(spec.name, spec)
    return list(specs.values())


def topic_replication(settings: Settings, brokers: int) -> int:
    """The profile's replication factor (Settings.topic_replication: 1 single, 3 cluster); a bootstrap that reaches
    more brokers than the profile names (the multi-broker scale test) gets min(3, brokers)."""
    wanted = max(settings.topic_replication, min(3, brokers))
    if wanted > brokers:
        raise TopicError(f"the {settings.profile} profile wants replication factor {wanted}, but only {brokers} "
                         f"broker(s) answer at {settings.kafka_bootstrap}; is every broker up? `ugt stack status`")
    return wanted


def admin_client(settings: Settings) -> AdminClient:
    from streams.producer import KAFKA_LOG  # librdkafka logs through logging, deduplicated

    return AdminClient({"bootstrap.servers": settings.kafka_bootstrap, "logger": KAFKA_LOG})


def ensure_topics(
    settings: Settings | None = None,
    extra: Iterable[TopicSpec | str] = (),
    timeout_s: float = 15.0,
) -> dict[str, str]:
    """Create the pipeline's topics (and any `extra`) if missing; returns {topic: 'created' | 'exists'}."""
    settings = settings or get_settings()
    specs = planned_topics(settings, extra)
    admin = admin_client(settings)
    try:
        metadata = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicError(
            f"Kafka at {settings.kafka_bootstrap} is unreachable ({exc}); is the stack up? `ugt stack status`"
        ) from exc
    brokers = max(1, len(metadata.brokers))
    replication = topic_replication(settings, brokers)
    result: dict[str, str] = {}
    new: list[NewTopic] = []
    for spec in specs:
        existing = metadata.topics.get(spec.name)
        if existing is not None and existing.error is None:
            result[spec.name] = "exists"
            if len(existing.partitions) < spec.partitions:
                log.warning("topic %s has %d partitions, fewer than the %d wanted; left as is",
                            spec.name, len(existing.partitions), spec.partitions)
            continue
        config = dict(spec.config)
        if replication >= 3:  # an acks=all write survives one lost broker, and one more broker may be down
            config.setdefault("min.insync.replicas", str(replication - 1))
        new.append(NewTopic(spec.name, num_partitions=spec.partitions, replication_factor=replication, config=config))
    if not new:
        return result
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    for name, future in futures.items():
        try:
            future.result()
            result[name] = "created"
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result[name] = "exists"  # created concurrently by someone else
            else:
                raise TopicError(f"could not create topic {name}: {exc}") from exc
    log.info("topics: %s", result)
    return result


# schema of each pipeline topic (Topics field -> schemas/<name>.avsc)
TOPIC_SCHEMAS = {"raw": "user_event", "items": "item_event", "tokens": "tokenized_event", "dlq": "dead_letter",
                 "impressions": "impression"}
CONTENT_TYPE = {"Content-Type": "application/vnd.schemaregistry.v1+json"}


def compatibility_rules() -> dict[str, str]:
    """schema name -> the registry compatibility level it keeps (schemas/history/compatibility.json)."""
    data = json.loads((SCHEMA_DIR / "history" / "compatibility.json").read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def ensure_subject(settings: Settings, topic: str, schema_name: str, timeout_s: float = 5.0) -> int:
    """Set `<topic>-value`'s compatibility level to the schema's rule, then register the schema; its id."""
    subject = subject_for(topic)
    rule = compatibility_rules()[schema_name]
    try:
        response = requests.put(f"{settings.registry_url}/config/{subject}", json={"compatibility": rule},
                                headers=CONTENT_TYPE, timeout=timeout_s)
    except requests.RequestException as exc:
        raise RegistryError(f"Schema Registry at {settings.registry_url} is unreachable ({exc.__class__.__name__}); "
                            "is the stack up? `ugt stack status`") from exc
    if response.status_code >= 400:
        raise RegistryError(f"setting {subject} to {rule} -> {response.status_code}: {response.text[:300]}")
    return SchemaRegistryClient(settings.registry_url, timeout_s).register(subject, schema_text(schema_name))


def ensure_subjects(settings: Settings | None = None) -> dict[str, int]:
    """Every pipeline topic's subject with its rule and current schema; returns {subject: schema id}."""
    settings = settings or get_settings()
    return {
        subject_for(getattr(settings.topics, field)): ensure_subject(settings, getattr(settings.topics, field), name)
        for field, name in TOPIC_SCHEMAS.items()
    }


def ensure_pipeline(settings: Settings | None = None) -> dict[str, str]:
    """The pipeline's topics and schema subjects (what `ugt stack up` makes sure of); returns {topic: state}."""
    settings = settings or get_settings()
    topics = ensure_topics(settings)
    ensure_subjects(settings)
    return topics

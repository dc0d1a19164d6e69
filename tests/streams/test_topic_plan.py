"""streams/topics.py: which topics are created with what (pure planning; creation itself is an integration test)."""

from __future__ import annotations

from infra.settings import get_settings
from streams.topics import TOPIC_SCHEMAS, TopicSpec, compatibility_rules, planned_topics, topic_specs


def test_pipeline_topics_and_extras() -> None:
    settings = get_settings()
    plan = {s.name: s for s in planned_topics(settings, ["my.topic", TopicSpec("big", 12)])}
    t = settings.topics
    assert set(plan) == {t.raw, t.items, t.tokens, t.dlq, t.impressions, t.experiment_metrics, "my.topic", "big"}
    assert plan[t.items].config == {"cleanup.policy": "compact"}  # latest version of every item kept
    assert plan["big"].partitions == 12 and plan["my.topic"].partitions == plan[t.raw].partitions


def test_a_pipeline_topic_named_again_keeps_its_spec() -> None:
    settings = get_settings()
    plan = planned_topics(settings, [settings.topics.items, settings.topics.dlq])
    assert len(plan) == len(topic_specs(settings))
    assert plan == topic_specs(settings)


def test_every_pipeline_topic_has_a_schema_with_a_rule() -> None:
    rules = compatibility_rules()
    assert set(TOPIC_SCHEMAS) == {"raw", "items", "tokens", "dlq", "impressions"}
    assert all(name in rules for name in TOPIC_SCHEMAS.values())

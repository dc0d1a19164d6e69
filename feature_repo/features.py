"""Feature views: what serving reads. Field names match contracts/user_state_rule.py FEATURE_NAMES (real time) and
LONG_TERM_FEATURE_NAMES (nearline). TTLs match the user_state job's --state-ttl-days and feature_store.yaml's
key_ttl_seconds (90 days): an idle user's state expires everywhere at about the same time."""

from datetime import timedelta

from entities import item, user
from feast import FeatureView, Field
from feast.types import Array, Int32, Int64, String
from sources import events_tokens_lake, item_metadata_push, user_long_term_push, user_recent_events_push

user_recent_events = FeatureView(
    name="user_recent_events",
    entities=[user],
    ttl=timedelta(days=90),
    schema=[
        Field(name="recent_item_ids", dtype=Array(String), description="Last N item ids, oldest first."),
        Field(name="recent_action_tokens", dtype=Array(Int64), description="Action token per event (contracts.tokenizer)."),
        Field(name="recent_rating_tokens", dtype=Array(Int64), description="Rating token per event."),
        Field(name="recent_event_times", dtype=Array(Int64), description="Event time per event, epoch ms."),
        Field(name="event_count", dtype=Int64, description="Events applied to this user so far."),
        Field(name="last_event_time", dtype=Int64, description="Newest event time, epoch ms."),
        Field(name="state_version", dtype=Int64, description="contracts.user_state_rule.STATE_VERSION of the writer."),
    ],
    source=user_recent_events_push,
    online=True,
    tags={"owner": "jobs/user_state_job.py", "freshness": "per event"},
)

user_long_term = FeatureView(
    name="user_long_term",
    entities=[user],
    ttl=timedelta(days=90),
    schema=[
        Field(name="long_group_counts", dtype=Array(Int64),
              description="Events per long-term group, oldest group first (older groups cover more events)."),
        Field(name="long_group_first_times", dtype=Array(Int64), description="Oldest event time per group, epoch ms."),
        Field(name="long_group_last_times", dtype=Array(Int64), description="Newest event time per group, epoch ms."),
        Field(name="long_group_rating_sums", dtype=Array(Int64), description="Sum of rating tokens per group."),
        Field(name="long_group_item_ids", dtype=Array(String),
              description="Per group its newest min(count, ITEMS_PER_GROUP) item ids, groups concatenated."),
        Field(name="action_counts", dtype=Array(Int64), description="Applied events per action token."),
        Field(name="last_context_tokens", dtype=Array(Int64), description="Context tokens of the newest event."),
        Field(name="last_hour_token", dtype=Int64, description="Hour token of the newest event."),
        Field(name="last_domain", dtype=String, description="Domain of the newest event."),
        Field(name="compacted_event_count", dtype=Int64, description="event_count when this row was compacted."),
        Field(name="state_version", dtype=Int64, description="contracts.user_state_rule.STATE_VERSION of the writer."),
    ],
    source=user_long_term_push,
    online=True,
    tags={"owner": "jobs/user_state_job.py", "freshness": "every --compact-interval-min (nearline)"},
)

item_metadata = FeatureView(
    name="item_metadata",
    entities=[item],
    ttl=timedelta(days=3650),
    schema=[
        Field(name="title", dtype=String),
        Field(name="domain", dtype=String),
        Field(name="categories", dtype=Array(String)),
        Field(name="year", dtype=Int64),
        Field(name="semantic_ids", dtype=Array(Int64), description="The item's semantic-ID levels, when assigned."),
    ],
    source=item_metadata_push,
    online=True,
    tags={"owner": "jobs/item_semantic_ids_job.py"},
)


# Offline only: point-in-time lookups over the token lake (training sets, backfills); never materialized.
user_events_lake = FeatureView(
    name="user_events_lake",
    entities=[user],
    ttl=timedelta(0),  # no lookback limit
    schema=[
        Field(name="item_id", dtype=String, description="The event's item."),
        Field(name="action_token", dtype=Int32, description="contracts.tokenizer action token."),
        Field(name="rating_token", dtype=Int32, description="Half-star rating bucket, 0 = none."),
        Field(name="hour_token", dtype=Int32, description="Hour of day (UTC)."),
        Field(name="weekday_token", dtype=Int32, description="Day of week (UTC), 1 = Monday."),
        Field(name="semantic_ids", dtype=Array(Int32), description="The item's semantic-ID levels at tokenize time."),
        Field(name="sid_version", dtype=String, description="Semantic-ID store version of those levels."),
    ],
    source=events_tokens_lake,
    online=False,
    tags={"owner": "jobs/tokenize_job.py", "store": "offline (parquet lake)"},
)

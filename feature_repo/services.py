"""Feature services, versioned by name: serving asks for exactly one of these."""

from feast import FeatureService
from features import item_metadata, user_long_term, user_recent_events

recommend_v1 = FeatureService(
    name="recommend_v1",
    features=[user_recent_events],
    description="What /recommend reads per request: the user's recent-event state.",
)

recommend_v2 = FeatureService(
    name="recommend_v2",
    features=[user_recent_events, user_long_term],
    description="The multi-scale state: recent events (real time) plus the compacted long-term history (nearline).",
)

item_catalog_v1 = FeatureService(name="item_catalog_v1", features=[item_metadata])

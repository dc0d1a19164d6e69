"""Feature services, versioned by name: serving asks for exactly one of these."""

from feast import FeatureService
from features import item_metadata, user_recent_events

recommend_v1 = FeatureService(
    name="recommend_v1",
    features=[user_recent_events],
    description="What /recommend reads per request: the user's recent-event state.",
)

item_catalog_v1 = FeatureService(name="item_catalog_v1", features=[item_metadata])

"""The keyed-state TTL every UGT operator uses: expire on write, never return expired, explicit cleanup."""

from __future__ import annotations

from pyflink.datastream.state import StateTtlConfig


def state_ttl(ms: int) -> StateTtlConfig:
    from pyflink.common.time import Time

    # cleanup named explicitly: PyFlink's default adds a RocksDB strategy a thread-mode worker cannot build
    return StateTtlConfig.new_builder(Time.milliseconds(ms)) \
        .set_update_type(StateTtlConfig.UpdateType.OnCreateAndWrite) \
        .set_state_visibility(StateTtlConfig.StateVisibility.NeverReturnExpired) \
        .disable_cleanup_in_background() \
        .cleanup_incrementally(10, False) \
        .cleanup_full_snapshot() \
        .build()

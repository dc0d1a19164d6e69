"""Dead letters: what every job sends to events.dlq when a record cannot be used (schemas/dead_letter.avsc).

The reason codes are the DLQ's contract with its readers; each job raises :class:`DeadLetterError` with one.
"""

from __future__ import annotations

from typing import Any

MAX_REASON_CHARS = 1000
REASON_CODES = (
    "BAD_MAGIC", "UNKNOWN_SCHEMA", "DECODE_ERROR", "OVERSIZED",
    "MISSING_FIELD", "WRONG_TYPE", "BAD_VALUE", "FAR_FUTURE", "TOO_OLD", "UNKNOWN_ITEM", "PROCESSING_ERROR",
)

class DeadLetterError(ValueError):
    """A record the job cannot use; carries the dead letter's reason code and text."""

    def __init__(self, reason_code: str, reason: str):
        super().__init__(f"{reason_code}: {reason}")
        self.reason_code = reason_code
        self.reason = reason[:MAX_REASON_CHARS]


def dead_letter_record(
    original: bytes | None, topic: str, partition: int, offset: int,
    reason_code: str, reason: str, job: str, failed_at_ms: int,
) -> dict[str, Any]:
    """A record of schemas/dead_letter.avsc (a null value is kept as empty bytes)."""
    return {
        "original": bytes(original) if original is not None else b"",
        "topic": topic,
        "partition": int(partition),
        "offset": int(offset),
        "reason_code": reason_code,
        "reason": reason[:MAX_REASON_CHARS],
        "job": job,
        "failed_at": int(failed_at_ms),
    }


def dead_letter_key(topic: str, partition: int, offset: int) -> bytes:
    """DLQ records are keyed by where the original came from, so replays of it land beside it."""
    return f"{topic}:{partition}:{offset}".encode()

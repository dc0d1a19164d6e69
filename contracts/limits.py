"""Bounds every layer enforces alike, so what the jobs accept a request can always read back."""

from __future__ import annotations

# user and item ids: the tokenizer dead-letters longer ones (BAD_VALUE) and /recommend rejects them (422)
MAX_ID_CHARS = 256

# a domain name ("movie", "shop-eu"): it becomes part of Redis keys (ugt:popularity:<domain>), so the tokenizer
# dead-letters others (BAD_VALUE) and /recommend and the serving config refuse them (422 / a start-up error)
DOMAIN_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

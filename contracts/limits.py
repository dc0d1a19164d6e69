"""Bounds every layer enforces alike, so what the jobs accept a request can always read back."""

from __future__ import annotations

# user and item ids: the tokenizer dead-letters longer ones (BAD_VALUE) and /recommend rejects them (422)
MAX_ID_CHARS = 256

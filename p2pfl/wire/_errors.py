"""The one exception type that wire decoding lets escape."""

from __future__ import annotations

# Every reason a frame or payload can be rejected for, as short stable slugs (counted in metrics).
REASONS: frozenset[str] = frozenset(
    {
        "oversized",  # frame, string, binary, array, map or element count above a limit
        "too_deep",  # containers nested deeper than the limit
        "truncated",  # the bytes end in the middle of a value or before the signature
        "malformed",  # not valid msgpack, trailing bytes, wrong envelope or tensor layout
        "ext_type",  # msgpack extension types are never accepted
        "bad_version",  # envelope or tensor format version this code does not speak
        "id_key_mismatch",  # the claimed sender node id is not the id of the sender key
        "unknown_key",  # the sender key is not trusted by the local policy
        "bad_signature",  # signature invalid (also: signed for another domain)
        "wrong_recipient",  # addressed to another node
        "expired",  # timestamp older than the allowed clock skew
        "from_future",  # timestamp further ahead than the allowed clock skew
        "replay",  # sequence number already seen from this sender
        "stale_seq",  # sequence number older than the replay window
        "bad_tensor",  # tensor dtype/shape/size/codec invalid or outside the limits
    }
)


class WireError(Exception):
    """Bytes from the network were rejected; ``reason`` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail

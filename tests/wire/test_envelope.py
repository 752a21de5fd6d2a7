"""Sealing and opening envelopes: every rejection reason, and no state change on rejection."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from p2pfl.identity import NodeIdentity
from p2pfl.wire import (
    DecodeLimits,
    Domain,
    EnvelopeVerifier,
    SequenceCounter,
    WireError,
    pack,
    seal,
    signing_input,
)

NOW = 1_800_000_000.0


def sign_payload(identity: NodeIdentity, payload: Any, domain: Domain = Domain.MESSAGE) -> bytes:
    """A frame for an arbitrary payload, signed exactly as the spec says (payload || c4 40 sig)."""
    signed = pack(payload)
    return signed + b"\xc4\x40" + identity.sign(signing_input(domain, signed))


def verifier_for(
    *trusted: NodeIdentity, own: NodeIdentity | None = None, **kw: object
) -> EnvelopeVerifier:
    keys = {t.public_key for t in trusted}
    return EnvelopeVerifier(
        is_trusted=keys.__contains__,
        own_key=None if own is None else own.public_key,
        **kw,  # type: ignore[arg-type]
    )


def test_sealed_envelope_opens_with_all_fields(alice: NodeIdentity, bob: NodeIdentity) -> None:
    body = {"round": 3, "weights": b"\x00\x01", "loss": 0.25, "peers": ["x", None, True]}
    frame = seal(alice, kind="model", body=body, seq=7, now=NOW, recipient=bob.public_key)
    envelope = verifier_for(alice, own=bob).open(frame, now=NOW + 1)
    assert envelope.kind == "model" and envelope.body == body
    assert (envelope.sender, envelope.recipient) == (alice.public_key, bob.public_key)
    assert (envelope.seq, envelope.timestamp_ms, envelope.version) == (7, round(NOW * 1000), 1)
    assert envelope.sender_id == alice.node_id


def test_broadcast_envelope_is_accepted_by_anyone(alice: NodeIdentity, bob: NodeIdentity) -> None:
    frame = seal(alice, kind="hello", body=None, seq=1, now=NOW)
    assert verifier_for(alice, own=bob).open(frame, now=NOW).recipient is None


def test_reordered_frames_within_window_are_accepted(alice: NodeIdentity) -> None:
    verifier = verifier_for(alice)
    for seq in (10, 12, 11, 5, 13):
        verifier.open(seal(alice, kind="k", body=seq, seq=seq, now=NOW), now=NOW)


def test_sequence_counter_continues_above_numbers_sent_before_a_restart() -> None:
    before = SequenceCounter(NOW)
    sent = [before.next() for _ in range(1000)]
    after = SequenceCounter(NOW + 1.0)
    assert after.next() > max(sent)


def _mutated_payload(alice: NodeIdentity, **changes: object) -> list[object]:
    fields = dict(v=1, kind="k", sender=alice.public_key, sid=alice.node_id, to=None, seq=5)
    fields.update(ts=round(NOW * 1000), body={})
    fields.update(changes)
    return list(fields.values())


# Each case: (expected reason, verifier factory, frame factory, now). The valid frame that
# follows every rejection has seq 5 too: it proves the rejection consumed no sequence number.
Case = tuple[
    str,
    Callable[[NodeIdentity, NodeIdentity], EnvelopeVerifier],
    Callable[[NodeIdentity, NodeIdentity], bytes],
]
_GOOD_SEQ = 5


def _seal(a: NodeIdentity, **kw: object) -> bytes:
    args: dict[str, object] = {"kind": "k", "body": {}, "seq": _GOOD_SEQ, "now": NOW}
    args.update(kw)
    return seal(a, **args)  # type: ignore[arg-type]


def _deep(depth: int) -> object:
    body: object = []
    for _ in range(depth - 1):
        body = [body]
    return body


CASES: dict[str, Case] = {
    "unknown_key": ("unknown_key", lambda a, b: verifier_for(b), lambda a, b: _seal(a)),
    "bad_signature": (
        "bad_signature",
        lambda a, b: verifier_for(a),
        lambda a, b: _seal(a)[:-1] + bytes([_seal(a)[-1] ^ 1]),
    ),
    "wrong_domain": (
        "bad_signature",
        lambda a, b: verifier_for(a),
        lambda a, b: _seal(a, domain=Domain.SIGNALING),
    ),
    "truncated": ("truncated", lambda a, b: verifier_for(a), lambda a, b: _seal(a)[:-1]),
    "truncated_to_nothing": ("truncated", lambda a, b: verifier_for(a), lambda a, b: b"\x98"),
    "id_key_mismatch": (
        "id_key_mismatch",
        lambda a, b: verifier_for(a, b),
        lambda a, b: sign_payload(a, _mutated_payload(a, sid=b.node_id)),
    ),
    "key_of_other_sender": (
        "bad_signature",
        lambda a, b: verifier_for(a, b),
        lambda a, b: sign_payload(a, _mutated_payload(a, sender=b.public_key, sid=b.node_id)),
    ),
    "expired": ("expired", lambda a, b: verifier_for(a), lambda a, b: _seal(a, now=NOW - 61)),
    "from_future": (
        "from_future",
        lambda a, b: verifier_for(a),
        lambda a, b: _seal(a, now=NOW + 61),
    ),
    "oversized": (
        "oversized",
        lambda a, b: verifier_for(a, limits=DecodeLimits(max_frame_bytes=4096)),
        lambda a, b: _seal(a, body=b"x" * 5000),
    ),
    "oversized_string": (
        "oversized",
        lambda a, b: verifier_for(a, limits=DecodeLimits(max_str_bytes=100)),
        lambda a, b: _seal(a, body="y" * 101),
    ),
    "too_deep": ("too_deep", lambda a, b: verifier_for(a), lambda a, b: _seal(a, body=_deep(40))),
    "wrong_recipient": (
        "wrong_recipient",
        lambda a, b: verifier_for(a, own=b),
        lambda a, b: _seal(a, recipient=a.public_key),
    ),
    "bad_version": (
        "bad_version",
        lambda a, b: verifier_for(a),
        lambda a, b: sign_payload(a, _mutated_payload(a, v=2)),
    ),
    "malformed_layout": (
        "malformed",
        lambda a, b: verifier_for(a),
        lambda a, b: sign_payload(a, _mutated_payload(a)[:7]),
    ),
    "malformed_seq": (
        "malformed",
        lambda a, b: verifier_for(a),
        lambda a, b: sign_payload(a, _mutated_payload(a, seq=-1)),
    ),
    "ext_type": (
        "ext_type",
        lambda a, b: verifier_for(a),
        lambda a, b: b"\x92\xd4\x01\x00\x01" + b"\xc4\x40" + bytes(64),
    ),
    "missing_signature_header": (
        "malformed",
        lambda a, b: verifier_for(a),
        lambda a, b: _seal(a)[:-66] + b"\xc4\x41" + _seal(a)[-64:],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rejected_frame_has_reason_and_changes_no_state(
    case: str, alice: NodeIdentity, bob: NodeIdentity
) -> None:
    reason, make_verifier, make_frame = CASES[case]
    verifier = make_verifier(alice, bob)
    seeded = bob if case == "unknown_key" else alice  # some state that must stay as it is
    verifier.open(_seal(seeded, seq=1), now=NOW)
    before = verifier.replay_state()
    with pytest.raises(WireError) as info:
        verifier.open(make_frame(alice, bob), now=NOW)
    assert info.value.reason == reason
    assert verifier.replay_state() == before
    if case == "unknown_key":
        return  # alice is never trusted by this verifier
    good = _seal(alice, recipient=bob.public_key) if case == "wrong_recipient" else _seal(alice)
    assert verifier.open(good, now=NOW).seq == _GOOD_SEQ


def test_replayed_frame_is_rejected_and_changes_no_state(alice: NodeIdentity) -> None:
    verifier = verifier_for(alice)
    frame = _seal(alice, seq=100)
    verifier.open(frame, now=NOW)
    before = verifier.replay_state()
    with pytest.raises(WireError) as info:
        verifier.open(frame, now=NOW + 1)
    assert info.value.reason == "replay"
    assert verifier.replay_state() == before


def test_sequence_number_below_window_is_rejected(alice: NodeIdentity) -> None:
    verifier = verifier_for(alice, replay_window=16)
    verifier.open(_seal(alice, seq=100), now=NOW)
    verifier.open(_seal(alice, seq=85), now=NOW)  # inside the window
    before = verifier.replay_state()
    with pytest.raises(WireError) as info:
        verifier.open(_seal(alice, seq=84), now=NOW)
    assert info.value.reason == "stale_seq"
    assert verifier.replay_state() == before


def test_huge_sequence_jump_does_not_blow_up_the_window(alice: NodeIdentity) -> None:
    verifier = verifier_for(alice)
    verifier.open(_seal(alice, seq=1), now=NOW)
    verifier.open(_seal(alice, seq=2**64 - 1), now=NOW)
    highest, seen = verifier.replay_state()[alice.public_key]
    assert highest == 2**64 - 1 and seen == 1


def test_seal_rejects_invalid_arguments(alice: NodeIdentity) -> None:
    with pytest.raises(ValueError):
        seal(alice, kind="", body=None, seq=1, now=NOW)
    with pytest.raises(ValueError):
        seal(alice, kind="k", body=None, seq=-1, now=NOW)
    with pytest.raises(ValueError):
        seal(alice, kind="k", body=None, seq=1, now=NOW, recipient=b"short")

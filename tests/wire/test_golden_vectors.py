"""protocols/vectors.json: decode, verify and re-encode byte for byte; any flipped byte fails."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from p2pfl.identity import NodeIdentity, verify_signature
from p2pfl.trust import FederationAuthority, TrustError, TrustPolicy, parse_revocations
from p2pfl.wire import (
    DeltaDecoder,
    DeltaEncoder,
    Domain,
    EnvelopeVerifier,
    WireError,
    decode_state_dict,
    encode_state_dict,
    seal,
    signing_input,
)

VECTORS = json.loads(
    (Path(__file__).resolve().parents[2] / "protocols" / "vectors.json").read_text()
)
KEYS = {
    name: NodeIdentity.from_seed(bytes.fromhex(k["seed"])) for name, k in VECTORS["keys"].items()
}


def from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$bin"}:
            return bytes.fromhex(value["$bin"])
        return {k: from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [from_json(v) for v in value]
    return value


def verifier(recipient: str | None) -> EnvelopeVerifier:
    trusted = {identity.public_key for identity in KEYS.values()}
    own = None if recipient is None else bytes.fromhex(recipient)
    return EnvelopeVerifier(is_trusted=trusted.__contains__, own_key=own)


def test_vector_keys_derive_their_public_keys_and_ids() -> None:
    for name, key in VECTORS["keys"].items():
        assert KEYS[name].public_key.hex() == key["public_key"]
        assert KEYS[name].node_id == key["node_id"]


ENVELOPES = {v["name"]: v for v in VECTORS["envelopes"]}


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_envelope_vector_verifies_decodes_and_reencodes(name: str) -> None:
    vector = ENVELOPES[name]
    expect, domain = vector["expect"], Domain[vector["domain"]]
    frame = bytes.fromhex(vector["frame"])
    assert frame[:-66].hex() == vector["signed_bytes"]
    envelope = verifier(expect["recipient"]).open(frame, now=vector["now"], domain=domain)
    body = from_json(expect["body"])
    assert (envelope.version, envelope.kind, envelope.seq) == (1, expect["kind"], expect["seq"])
    assert envelope.sender.hex() == expect["sender"] and envelope.sender_id == expect["sender_id"]
    assert envelope.recipient == (expect["recipient"] and bytes.fromhex(expect["recipient"]))
    assert envelope.timestamp_ms == expect["timestamp_ms"] and envelope.body == body
    resealed = seal(
        KEYS[vector["signer"]],
        kind=expect["kind"],
        body=body,
        seq=expect["seq"],
        now=expect["timestamp_ms"] / 1000,
        recipient=envelope.recipient,
        domain=domain,
    )
    assert resealed == frame


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_flipping_any_byte_of_an_envelope_vector_fails(name: str) -> None:
    vector = ENVELOPES[name]
    frame, domain = bytes.fromhex(vector["frame"]), Domain[vector["domain"]]
    for i in range(len(frame)):
        flipped = frame[:i] + bytes([frame[i] ^ 0xFF]) + frame[i + 1 :]
        with pytest.raises(WireError):
            verifier(vector["expect"]["recipient"]).open(flipped, now=vector["now"], domain=domain)


@pytest.mark.parametrize("vector", VECTORS["rejected"], ids=lambda v: v["name"])
def test_rejection_vector_is_rejected_with_its_reason(vector: dict[str, Any]) -> None:
    with pytest.raises(WireError) as info:
        verifier(None).open(bytes.fromhex(vector["frame"]), now=vector["now"])
    assert info.value.reason == vector["reason"]


@pytest.mark.parametrize("vector", VECTORS["certificates"], ids=lambda v: v["name"])
def test_certificate_vector_verifies_reencodes_and_resists_flips(vector: dict[str, Any]) -> None:
    authority = FederationAuthority.from_seed(bytes.fromhex(vector["federation_seed"]))
    assert authority.public_key.hex() == vector["federation_public_key"]
    assert authority.federation_id == vector["federation_id"]
    node = KEYS[vector["node"]].public_key
    certificate = bytes.fromhex(vector["certificate"])
    policy = TrustPolicy.federation(authority.public_key)
    assert policy.check(node, certificate, now=vector["check_at"]) == vector["member_name"]
    again = authority.admit(
        node,
        name=vector["member_name"],
        expires_at=vector["expires_at"],
        issued_at=vector["issued_at"],
    )
    assert again == certificate
    for i in range(len(certificate)):
        flipped = certificate[:i] + bytes([certificate[i] ^ 0xFF]) + certificate[i + 1 :]
        with pytest.raises(TrustError):
            policy.check(node, flipped, now=vector["check_at"])


@pytest.mark.parametrize("vector", VECTORS["revocations"], ids=lambda v: v["name"])
def test_revocation_vector_verifies_reencodes_and_resists_flips(vector: dict[str, Any]) -> None:
    authority = FederationAuthority.from_seed(bytes.fromhex(vector["federation_seed"]))
    data = bytes.fromhex(vector["list"])
    revoked = {KEYS[name].public_key: reason for name, reason in vector["revoked"]}
    listed = parse_revocations(data, authority.public_key)
    assert (listed.serial, listed.issued_at) == (vector["serial"], vector["issued_at"])
    assert dict(listed.revoked) == revoked
    again = authority.revoke(revoked, serial=vector["serial"], issued_at=vector["issued_at"])
    assert again == data
    for i in range(len(data)):
        flipped = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        with pytest.raises(TrustError):
            parse_revocations(flipped, authority.public_key)


@pytest.mark.parametrize("vector", VECTORS["state_dicts"], ids=lambda v: v["codec"])
def test_state_dict_vector_decodes_and_reencodes(vector: dict[str, Any]) -> None:
    source = {
        name: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
        for name, t in vector["source"].items()
    }
    data = bytes.fromhex(vector["data"])
    assert encode_state_dict(source, vector["codec"], topk_ratio=vector["topk_ratio"]) == data
    decoded = decode_state_dict(data)
    for name, values in vector["decoded"].items():
        assert decoded[name].reshape(-1).tolist() == values
        assert decoded[name].shape == source[name].shape
        assert decoded[name].dtype == source[name].dtype
    if vector["codec"] == "fp32":
        assert all(torch.equal(decoded[k], v) for k, v in source.items())


def _tensors(listed: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        name: torch.tensor(t["values"], dtype=getattr(torch, t["dtype"])).reshape(t["shape"])
        for name, t in listed.items()
    }


@pytest.mark.parametrize("vector", VECTORS["state_deltas"], ids=lambda v: v["name"])
def test_state_delta_vector_decodes_and_reencodes(vector: dict[str, Any]) -> None:
    initial, model = _tensors(vector["initial"]), _tensors(vector["model"])
    data = bytes.fromhex(vector["data"])
    encoder = DeltaEncoder(topk_ratio=vector["topk_ratio"], initial=initial)
    assert encoder.encode(model) == data
    decoded = DeltaDecoder(initial=initial).decode(data)
    for name, values in vector["decoded"].items():
        assert decoded[name].reshape(-1).tolist() == values
        assert decoded[name].shape == initial[name].shape
    for i in range(len(data)):  # any changed byte: refused, or a different model
        flipped = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        try:
            other = DeltaDecoder(initial=initial).decode(flipped)
        except WireError:
            continue
        assert any(not torch.equal(other[k], decoded[k]) for k in decoded), i


@pytest.mark.parametrize("vector", VECTORS["adverts"], ids=lambda v: v["name"])
def test_advert_vector_verifies_reproduces_and_resists_every_changed_character(
    vector: dict[str, Any],
) -> None:
    from p2pfl.daemon.adverts import Advert, AdvertVerifier, DiscoveryError, ResolvedAdvert

    node = KEYS[vector["node"]]
    authority = FederationAuthority.from_seed(bytes.fromhex(vector["federation_seed"]))
    policy = TrustPolicy.federation(authority.public_key)
    txt: dict[str, str] = vector["txt"]
    addresses = tuple(vector["resolved_addresses"])

    def check(properties: dict[str, str]) -> str:
        props = {k.encode(): v.encode() for k, v in properties.items()}
        resolved = ResolvedAdvert(props, addresses, vector["resolved_port"])
        candidate = AdvertVerifier("", policy).check(resolved, vector["check_at"])
        assert candidate.public_key == node.public_key
        return candidate.host

    assert check(txt) == vector["candidate_host"]
    certificate = base64.b64decode(txt["c0"] + txt.get("c1", ""))
    advert = Advert("0.0.0.0", int(txt["port"]), txt["fed"], certificate)
    assert advert.properties(node, txt["a"].split(","), vector["issued_at"]) == txt
    signed = bytes.fromhex(vector["signed_bytes"])
    assert signing_input(Domain.DISCOVERY, signed).hex() == vector["signing_input"]
    to_verify = bytes.fromhex(vector["signing_input"])
    assert verify_signature(node.public_key, bytes.fromhex(txt["sig"]), to_verify)
    for key, value in txt.items():
        for i in range(len(value)):
            changed = dict(txt, **{key: value[:i] + "~" + value[i + 1 :]})
            with pytest.raises(DiscoveryError):
                check(changed)

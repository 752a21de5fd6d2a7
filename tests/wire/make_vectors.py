"""Generate protocols/vectors.json, the golden vectors of the wire protocol (see SPEC.md).

Everything is deterministic: fixed key seeds, fixed clocks, fixed nonces, and Ed25519 signatures
are deterministic. Running this again must reproduce the file byte for byte; the tests in
tests/wire/test_golden_vectors.py decode, verify and re-encode every vector.

Run: python tests/wire/make_vectors.py   (writes protocols/vectors.json)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from p2pfl.daemon.adverts import PROTOCOL_VERSION, Advert, advert_signed_bytes
from p2pfl.identity import NodeIdentity
from p2pfl.trust import FederationAuthority
from p2pfl.wire import (
    DeltaDecoder,
    DeltaEncoder,
    Domain,
    decode_state_dict,
    encode_state_dict,
    pack,
    seal,
    signing_input,
)

NOW = 1_767_225_600.0  # 2026-01-01T00:00:00Z
SEEDS = {"alice": b"alice".ljust(32, b"\x00"), "bob": b"bob".ljust(32, b"\x00")}
FEDERATION_SEED = b"federation".ljust(32, b"\x00")


def to_json(value: Any) -> Any:
    """msgpack value -> JSON: bytes become {"$bin": hex}; everything else maps directly."""
    if isinstance(value, bytes):
        return {"$bin": value.hex()}
    if isinstance(value, list):
        return [to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    return value


def tiny_state() -> dict[str, torch.Tensor]:
    return {
        "fc.weight": torch.tensor([[0.5, -1.25, 2.0], [0.0, 0.1, -0.3]]),
        "fc.bias": torch.tensor([1.0, -0.5]),
        "bn.num_batches_tracked": torch.tensor(42),
    }


def advert_vector(node: NodeIdentity, federation_id: str, certificate: bytes) -> dict[str, Any]:
    """A federation member's signed mDNS advert (SPEC.md section 8)."""
    addresses, port = ["192.0.2.10", "198.51.100.7"], 7470
    txt = Advert("0.0.0.0", port, federation_id, certificate).properties(node, addresses, NOW)
    signed = advert_signed_bytes(
        node.node_id,
        node.public_key,
        addresses,
        port,
        federation_id,
        PROTOCOL_VERSION,
        int(NOW * 1000),
        int(NOW * 1000) + 3_600_000,
        certificate,
    )
    return {
        "name": "alice-federation-member",
        "node": "alice",
        "federation_seed": FEDERATION_SEED.hex(),
        "issued_at": NOW,
        "check_at": NOW + 600,
        "resolved_addresses": ["198.51.100.7"],
        "resolved_port": port,
        "txt": txt,
        "signed_bytes": signed.hex(),
        "signing_input": signing_input(Domain.DISCOVERY, signed).hex(),
        "candidate_host": "198.51.100.7",
    }


def main() -> None:
    keys = {name: NodeIdentity.from_seed(seed) for name, seed in SEEDS.items()}
    alice, bob = keys["alice"], keys["bob"]
    state = tiny_state()

    envelopes: list[dict[str, Any]] = []

    def envelope(name: str, **args: Any) -> bytes:
        frame = seal(alice, now=NOW, **args)
        recipient = args.get("recipient")
        domain = args.get("domain", Domain.MESSAGE)
        envelopes.append(
            {
                "name": name,
                "domain": domain.name,
                "signer": "alice",
                "now": NOW,
                "frame": frame.hex(),
                "signed_bytes": frame[:-66].hex(),
                "signing_input": signing_input(domain, frame[:-66]).hex(),
                "expect": {
                    "version": 1,
                    "kind": args["kind"],
                    "sender": alice.public_key.hex(),
                    "sender_id": alice.node_id,
                    "recipient": None if recipient is None else recipient.hex(),
                    "seq": args["seq"],
                    "timestamp_ms": round(NOW * 1000),
                    "body": to_json(args["body"]),
                },
            }
        )
        return frame

    envelope(
        "features-request-broadcast", kind="features.request", body={"sensors": [3, 17, 204]}, seq=1
    )
    envelope(
        "gossip-model-fp32",
        kind="gossip.model",
        recipient=bob.public_key,
        seq=2,
        body={"weights": encode_state_dict(state, "fp32"), "age": 3, "samples": 120},
    )
    envelope(
        "round-update-int8",
        kind="round.update",
        seq=3,
        body={"round": 7, "weights": encode_state_dict(state, "int8"), "samples": 64},
    )
    offer = {
        "from": alice.node_id,
        "nonce": bytes(range(16)),
        "expires_ms": round(NOW * 1000) + 30000,
        "cert": None,
        "to": bob.node_id,
        "sdp": "v=0\r\no=- 1 1 IN IP4 127.0.0.2\r\n",
        "port": 7410,
    }
    signaling = envelope(
        "sdp-offer-signaling",
        kind="sdp-offer",
        body=offer,
        seq=4,
        recipient=bob.public_key,
        domain=Domain.SIGNALING,
    )

    def raw_frame(payload: list[Any]) -> bytes:
        signed = pack(payload)
        return signed + b"\xc4\x40" + alice.sign(signing_input(Domain.MESSAGE, signed))

    good_payload: list[Any] = [
        1,
        "k",
        alice.public_key,
        alice.node_id,
        None,
        9,
        round(NOW * 1000),
        {},
    ]
    deep: Any = []
    for _ in range(33):
        deep = [deep]
    rejected = [
        ("signaling-frame-as-message", signaling, "bad_signature"),
        ("expired", seal(alice, kind="k", body={}, seq=5, now=NOW - 61), "expired"),
        ("from-future", seal(alice, kind="k", body={}, seq=6, now=NOW + 61), "from_future"),
        (
            "id-key-mismatch",
            raw_frame([*good_payload[:3], bob.node_id, *good_payload[4:]]),
            "id_key_mismatch",
        ),
        ("version-2", raw_frame([2, *good_payload[1:]]), "bad_version"),
        ("too-deep", raw_frame([*good_payload[:7], deep]), "too_deep"),
        ("truncated", seal(alice, kind="k", body={}, seq=7, now=NOW)[:-1], "truncated"),
        ("ext-type", b"\x98\xd4\x01\x00" + b"\xc4\x40" + bytes(64), "ext_type"),
    ]

    authority = FederationAuthority.from_seed(FEDERATION_SEED)
    certificate = authority.admit(
        alice.public_key, name="cloudlet-1", expires_at=NOW + 365 * 86400, issued_at=NOW
    )

    revocations = authority.revoke(
        {bob.public_key: "key compromised", alice.public_key: None},
        serial=1_800_000_000_000,
        issued_at=NOW,
    )

    state_dicts = []
    for codec in ("fp32", "fp16", "bf16", "int8", "topk"):
        data = encode_state_dict(state, codec, topk_ratio=0.5)
        decoded = decode_state_dict(data)
        state_dicts.append(
            {
                "codec": codec,
                "topk_ratio": 0.5,
                "data": data.hex(),
                "source": {
                    k: {
                        "dtype": str(v.dtype).removeprefix("torch."),
                        "shape": list(v.shape),
                        "values": v.reshape(-1).tolist(),
                    }
                    for k, v in state.items()
                },
                "decoded": {k: v.reshape(-1).tolist() for k, v in decoded.items()},
            }
        )

    def listed(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        return {
            k: {
                "dtype": str(v.dtype).removeprefix("torch."),
                "shape": list(v.shape),
                "values": v.reshape(-1).tolist(),
            }
            for k, v in tensors.items()
        }

    # A link that starts from a model both ends hold (SPEC.md section 6, state deltas).
    moved = {
        "fc.weight": torch.tensor([[0.5, -1.0, 2.0], [0.75, 0.1, -0.3]]),
        "fc.bias": torch.tensor([1.0, 0.25]),
        "bn.num_batches_tracked": torch.tensor(43),
    }
    delta = DeltaEncoder(topk_ratio=0.34, initial=state).encode(moved)
    state_deltas = [
        {
            "name": "from-initial",
            "topk_ratio": 0.34,
            "initial": listed(state),
            "model": listed(moved),
            "data": delta.hex(),
            "decoded": {
                k: v.reshape(-1).tolist()
                for k, v in DeltaDecoder(initial=state).decode(delta).items()
            },
        }
    ]

    vectors = {
        "about": "Golden vectors of the p2pfl wire protocol v1; see protocols/SPEC.md. "
        "Generated by tests/wire/make_vectors.py. Binary values are hex; inside "
        'bodies, {"$bin": hex} stands for a msgpack bin.',
        "keys": {
            name: {
                "seed": seed.hex(),
                "public_key": keys[name].public_key.hex(),
                "node_id": keys[name].node_id,
            }
            for name, seed in SEEDS.items()
        },
        "envelopes": envelopes,
        "rejected": [
            {"name": n, "frame": f.hex(), "now": NOW, "reason": r} for n, f, r in rejected
        ],
        "certificates": [
            {
                "name": "cloudlet-1-one-year",
                "federation_seed": FEDERATION_SEED.hex(),
                "federation_public_key": authority.public_key.hex(),
                "federation_id": authority.federation_id,
                "node": "alice",
                "member_name": "cloudlet-1",
                "issued_at": NOW,
                "expires_at": NOW + 365 * 86400,
                "check_at": NOW + 86400,
                "certificate": certificate.hex(),
            }
        ],
        "revocations": [
            {
                "name": "bob-and-alice",
                "federation_seed": FEDERATION_SEED.hex(),
                "serial": 1_800_000_000_000,
                "issued_at": NOW,
                "revoked": [["bob", "key compromised"], ["alice", None]],
                "list": revocations.hex(),
            }
        ],
        "state_dicts": state_dicts,
        "state_deltas": state_deltas,
        "adverts": [advert_vector(alice, authority.federation_id, certificate)],
    }
    out = Path(__file__).resolve().parents[2] / "protocols" / "vectors.json"
    out.write_text(json.dumps(vectors, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

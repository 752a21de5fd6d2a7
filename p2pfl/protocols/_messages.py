"""Protocol messages and their envelope bodies.

Each message is a frozen dataclass with a ``KIND`` (the envelope's ``kind`` field) and
``to_body()`` / ``from_body()`` that map it to and from a msgpack-able dict, the ``body`` of a
signed ``p2pfl.wire.Envelope``. Models travel as bytes inside the body: the driver passes
``encode_weights`` (e.g. ``p2pfl.wire.encode_state_dict``) and ``decode_weights`` (its inverse);
without them the weights handle must already be ``bytes``.

Remote input is untrusted: ``from_body`` / ``decode_message`` check every field's type and range
and raise ``MessageError`` (with a reason slug for the driver's drop counter), never anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeAlias, TypeVar, Union, cast

W = TypeVar("W")

MAX_ROUND = 2**53
MAX_SENSORS = 100_000
MAX_SAMPLES = 2**40


class MessageError(Exception):
    """A message body from a peer is malformed; ``reason`` is a short slug for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _as_bytes(weights: object) -> bytes:
    if not isinstance(weights, bytes):
        raise TypeError(
            f"weights handle is {type(weights).__name__}, not bytes: "
            "pass encode_weights to to_body()"
        )
    return weights


def _field(body: Mapping[str, Any], key: str, kind: type) -> Any:
    if key not in body:
        raise MessageError("malformed_body", f"missing field {key!r}")
    value = body[key]
    # bool is an int subclass; a round number of True is still malformed.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise MessageError("malformed_body", f"field {key!r} is not {kind.__name__}")
    return value


def _count(body: Mapping[str, Any], key: str, limit: int) -> int:
    value = cast(int, _field(body, key, int))
    if not 0 <= value <= limit:
        raise MessageError("malformed_body", f"field {key!r}={value} outside 0..{limit}")
    return value


def _sensors(body: Mapping[str, Any]) -> tuple[int, ...]:
    raw = _field(body, "sensors", list)
    if len(raw) > MAX_SENSORS:
        raise MessageError("malformed_body", f"{len(raw)} sensors, limit {MAX_SENSORS}")
    if not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in raw):
        raise MessageError("malformed_body", "sensors must be non-negative integers")
    return tuple(raw)


def _mapping(body: object, kind: str) -> Mapping[str, Any]:
    if not isinstance(body, Mapping):
        raise MessageError("malformed_body", f"{kind} body is {type(body).__name__}, not a map")
    return cast(Mapping[str, Any], body)


def _weights(body: Mapping[str, Any], decode: Callable[[bytes], W] | None) -> W:
    raw = cast(bytes, _field(body, "weights", bytes))
    if decode is None:
        return cast(W, raw)
    try:
        return decode(raw)
    except Exception as exc:  # the decoder's own error types are not ours to know
        raise MessageError("bad_weights", f"{type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class GossipModel(Generic[W]):
    """Gossip learning: a trained model, its age (trainings behind it) and local sample count."""

    KIND: ClassVar[str] = "gossip.model"
    weights: W
    age: int
    samples: int

    def to_body(self, encode_weights: Callable[[W], bytes] | None = None) -> dict[str, object]:
        raw = encode_weights(self.weights) if encode_weights else _as_bytes(self.weights)
        return {"weights": raw, "age": self.age, "samples": self.samples}

    @classmethod
    def from_body(
        cls, body: object, decode_weights: Callable[[bytes], W] | None = None
    ) -> GossipModel[W]:
        fields = _mapping(body, cls.KIND)
        return cls(
            weights=_weights(fields, decode_weights),
            age=_count(fields, "age", MAX_ROUND),
            samples=_count(fields, "samples", MAX_SAMPLES),
        )


@dataclass(frozen=True, slots=True)
class RoundUpdate(Generic[W]):
    """Server-free FL and FedAvg: a node's trained model for round ``round``."""

    KIND: ClassVar[str] = "round.update"
    round: int
    weights: W
    samples: int

    def to_body(self, encode_weights: Callable[[W], bytes] | None = None) -> dict[str, object]:
        raw = encode_weights(self.weights) if encode_weights else _as_bytes(self.weights)
        return {"round": self.round, "weights": raw, "samples": self.samples}

    @classmethod
    def from_body(
        cls, body: object, decode_weights: Callable[[bytes], W] | None = None
    ) -> RoundUpdate[W]:
        fields = _mapping(body, cls.KIND)
        return cls(
            round=_count(fields, "round", MAX_ROUND),
            weights=_weights(fields, decode_weights),
            samples=_count(fields, "samples", MAX_SAMPLES),
        )


@dataclass(frozen=True, slots=True)
class GlobalModel(Generic[W]):
    """FedAvg: the aggregator's model that starts round ``round``."""

    KIND: ClassVar[str] = "fedavg.global"
    round: int
    weights: W

    def to_body(self, encode_weights: Callable[[W], bytes] | None = None) -> dict[str, object]:
        raw = encode_weights(self.weights) if encode_weights else _as_bytes(self.weights)
        return {"round": self.round, "weights": raw}

    @classmethod
    def from_body(
        cls, body: object, decode_weights: Callable[[bytes], W] | None = None
    ) -> GlobalModel[W]:
        fields = _mapping(body, cls.KIND)
        return cls(
            round=_count(fields, "round", MAX_ROUND), weights=_weights(fields, decode_weights)
        )


@dataclass(frozen=True, slots=True)
class FeatureRequest:
    """Graph tasks: ask the owner of ``sensors`` for their readings (the requester's halo)."""

    KIND: ClassVar[str] = "features.request"
    sensors: tuple[int, ...]

    def to_body(self, encode_weights: object = None) -> dict[str, object]:
        return {"sensors": list(self.sensors)}

    @classmethod
    def from_body(cls, body: object, decode_weights: object = None) -> FeatureRequest:
        return cls(sensors=_sensors(_mapping(body, cls.KIND)))


@dataclass(frozen=True, slots=True)
class FeatureReply:
    """Graph tasks: the readings of ``sensors``, encoded by the owner's feature source."""

    KIND: ClassVar[str] = "features.reply"
    sensors: tuple[int, ...]
    data: bytes

    def to_body(self, encode_weights: object = None) -> dict[str, object]:
        return {"sensors": list(self.sensors), "data": self.data}

    @classmethod
    def from_body(cls, body: object, decode_weights: object = None) -> FeatureReply:
        fields = _mapping(body, cls.KIND)
        return cls(sensors=_sensors(fields), data=cast(bytes, _field(fields, "data", bytes)))


Message: TypeAlias = Union[
    "GossipModel[W]", "RoundUpdate[W]", "GlobalModel[W]", FeatureRequest, FeatureReply
]

MESSAGE_KINDS: tuple[str, ...] = (
    GossipModel.KIND,
    RoundUpdate.KIND,
    GlobalModel.KIND,
    FeatureRequest.KIND,
    FeatureReply.KIND,
)


def decode_message(
    kind: str, body: object, decode_weights: Callable[[bytes], W] | None = None
) -> Message[W]:
    """The message of envelope ``kind`` with ``body``; raises ``MessageError`` if malformed."""
    if kind == GossipModel.KIND:
        return GossipModel.from_body(body, decode_weights)
    if kind == RoundUpdate.KIND:
        return RoundUpdate.from_body(body, decode_weights)
    if kind == GlobalModel.KIND:
        return GlobalModel.from_body(body, decode_weights)
    if kind == FeatureRequest.KIND:
        return FeatureRequest.from_body(body)
    if kind == FeatureReply.KIND:
        return FeatureReply.from_body(body)
    raise MessageError("unknown_kind", f"no protocol message of kind {kind!r}")

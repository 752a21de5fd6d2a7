"""The per-link delta codec: top-k of the update with error feedback (issue 13, part 5)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from p2pfl.wire import (
    DeltaDecoder,
    DeltaEncoder,
    UpdateEncoder,
    WireError,
    decode_state_dict,
    decode_update,
    pack,
    unpack,
)
from p2pfl.wire import encode_state_dict as encode
from p2pfl.wire._delta import state_digest


def _model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 25, generator=g),
        "b": torch.randn(25, generator=g),
        "steps": torch.tensor(3),
    }


def _drift(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {
        k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in state.items() if k != "steps"
    }
    out["steps"] = state["steps"] + 1
    return out


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_first_message_is_a_keyframe_decoded_exactly() -> None:
    sender, receiver = DeltaEncoder(), DeltaDecoder()
    model = _model()
    data = sender.encode(model)
    assert unpack(data)[:4] == ["p2pfl.state_delta", 1, 0, 1]
    assert _equal(receiver.decode(data), model)


def test_a_delta_sends_the_largest_changes_and_the_rest_follows_later() -> None:
    sender, receiver = DeltaEncoder(topk_ratio=0.25), DeltaDecoder()
    old, new = _model(), _drift(_model(), 1)
    receiver.decode(sender.encode(old))
    first = sender.encode(new)
    assert unpack(first)[:4] == ["p2pfl.state_delta", 1, 1, 2]
    got = receiver.decode(first)
    changed = got["w"] != old["w"]
    assert int(changed.sum()) == 250  # a quarter of 1000 values, taken from the new model
    assert torch.equal(got["w"][changed], new["w"][changed])
    largest = (new["w"] - old["w"]).abs()[changed].min()
    assert bool(((new["w"] - old["w"]).abs()[~changed] <= largest).all())
    assert torch.equal(got["steps"], new["steps"])  # integer tensors travel whole
    # Error feedback: what was not sent goes out next; four deltas carry the whole update.
    for _ in range(3):
        got = receiver.decode(sender.encode(new))
    assert _equal(got, new)


def test_one_percent_deltas_are_a_small_fraction_of_a_keyframe() -> None:
    sender = DeltaEncoder(topk_ratio=0.01)
    model = _model()
    keyframe = sender.encode(model)
    delta = sender.encode(_drift(model, 1))
    assert len(delta) * 15 < len(keyframe)  # 1,025 values: headers weigh in


def test_a_lost_delta_is_refused_until_the_next_keyframe_heals_the_link() -> None:
    sender, receiver = DeltaEncoder(keyframe_every=4), DeltaDecoder()
    model = _model()
    receiver.decode(sender.encode(model))  # keyframe, seq 1
    sender.encode(_drift(model, 1))  # seq 2: lost on the way
    with pytest.raises(WireError, match="reference 2, this link holds 1") as info:
        receiver.decode(sender.encode(_drift(model, 2)))
    assert info.value.reason == "bad_tensor"
    again = sender.encode(model)
    assert unpack(again)[2] == 3  # still a delta: refused again
    with pytest.raises(WireError):
        receiver.decode(again)
    # The fourth message after the keyframe is a keyframe again.
    last = _drift(model, 3)
    data = sender.encode(last)
    assert unpack(data)[2] == 0 and _equal(receiver.decode(data), last)


def test_a_new_session_starts_with_a_keyframe() -> None:
    sender, receiver = DeltaEncoder(), DeltaDecoder()
    model = _model()
    receiver.decode(sender.encode(model))
    receiver.reset()
    with pytest.raises(WireError, match="holds none"):
        receiver.decode(sender.encode(_drift(model, 1)))
    sender.reset()
    data = sender.encode(model)
    assert unpack(data)[2] == 0 and _equal(receiver.decode(data), model)


def test_decoded_models_are_never_changed_by_later_messages() -> None:
    sender, receiver = DeltaEncoder(topk_ratio=0.5), DeltaDecoder()
    first = receiver.decode(sender.encode(_model()))
    kept = {k: v.clone() for k, v in first.items()}
    second = receiver.decode(sender.encode(_drift(_model(), 1)))
    assert _equal(first, kept)
    receiver.decode(sender.encode(_drift(_model(), 2)))
    assert not _equal(second, first)


def test_a_keyframe_in_a_lossy_codec_keeps_both_references_equal() -> None:
    sender, receiver = DeltaEncoder(keyframe_codec="int8", topk_ratio=1.0), DeltaDecoder()
    model = _model()
    got = receiver.decode(sender.encode(model))
    assert _equal(got, decode_state_dict(encode(model, "int8")))
    assert _equal(receiver.decode(sender.encode(model)), model)  # ratio 1: all values


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        (["p2pfl.state_dict", 1, 0, 1, None, b""], "malformed"),
        (["p2pfl.state_delta", 2, 0, 1, None, b""], "bad_version"),
        (["p2pfl.state_delta", 1, 3, 3, b"12345678", b""], "malformed"),
        (["p2pfl.state_delta", 1, 0, 1, None, "not bytes"], "malformed"),
        (["p2pfl.state_delta", 1, True, 1, None, b""], "malformed"),
        (["p2pfl.state_delta", 1, 0, 1, b"12345678", b""], "malformed"),
        (["p2pfl.state_delta", 1, 1, 2, None, b""], "malformed"),
        (["p2pfl.state_delta", 1, 0, 1, b""], "malformed"),
        ({"base": 0}, "malformed"),
    ],
)
def test_malformed_deltas_are_refused(message: object, reason: str) -> None:
    with pytest.raises(WireError) as info:
        DeltaDecoder().decode(pack(message))
    assert info.value.reason == reason


def test_a_delta_naming_other_tensors_than_the_reference_is_refused() -> None:
    receiver = DeltaDecoder()
    receiver.decode(DeltaEncoder().encode(_model()))
    other = {"w": torch.zeros(40, 25)}
    payload = encode(other, "topk", topk_indices={"w": torch.tensor([0, 5])})
    with pytest.raises(WireError, match="other tensors"):
        receiver.decode(pack(["p2pfl.state_delta", 1, 1, 2, state_digest(_model()), payload]))


def test_explicit_topk_indices_must_be_sorted_and_in_range() -> None:
    with pytest.raises(ValueError, match="strictly increasing"):
        encode({"w": torch.zeros(4)}, "topk", topk_indices={"w": torch.tensor([2, 1])})
    with pytest.raises(ValueError, match="strictly increasing"):
        encode({"w": torch.zeros(4)}, "topk", topk_indices={"w": torch.tensor([4])})


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"topk_ratio": 0.0}, "topk_ratio"),
        ({"keyframe_every": 0}, "keyframe_every"),
        ({"keyframe_codec": "topk"}, "keyframe_codec"),
    ],
)
def test_encoder_settings_out_of_range_are_refused(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DeltaEncoder(**setting)


def test_a_shared_initial_model_spares_the_first_keyframe() -> None:
    initial = _model()
    sender, receiver = DeltaEncoder(initial=initial), DeltaDecoder(initial=initial)
    new = _drift(initial, 1)
    data = sender.encode(new)
    assert unpack(data)[2:5] == [1, 2, state_digest(initial)]
    assert len(data) * 15 < len(encode(new))
    got = receiver.decode(data)
    assert int((got["w"] != initial["w"]).sum()) == 10
    receiver.reset()  # a new session starts again from the initial model
    sender.reset()
    assert receiver.decode(sender.encode(new)).keys() == new.keys()


def test_a_delta_on_another_initial_model_is_refused_by_its_digest() -> None:
    sender = DeltaEncoder(initial=_model(0))
    receiver = DeltaDecoder(initial=_model(1))
    with pytest.raises(WireError, match="digest differs") as info:
        receiver.decode(sender.encode(_drift(_model(0), 1)))
    assert info.value.reason == "bad_tensor"


def test_a_changed_only_delta_is_lossless_and_as_small_as_the_change() -> None:
    initial = _model()
    sender, receiver = DeltaEncoder(topk_ratio=None, initial=initial), DeltaDecoder(initial=initial)
    new = {k: v.clone() for k, v in initial.items()}
    new["w"][3, 4] += 1.0
    new["b"][7] -= 2.0
    data = sender.encode(new)
    assert _equal(receiver.decode(data), new)
    assert len(data) < 300
    assert _equal(receiver.decode(sender.encode(new)), new)  # nothing changed: nothing sent


def test_an_update_on_the_round_reference_carries_its_unsent_rest_to_the_next_round() -> None:
    reference = _model()
    trained = _drift(reference, 1)
    encoder = UpdateEncoder(topk_ratio=0.25)
    got = decode_update(encoder.encode(trained, reference), reference)
    sent = got["w"] != reference["w"]
    assert int(sent.sum()) == 250
    torch.testing.assert_close(got["w"][sent], trained["w"][sent])
    assert torch.equal(got["w"][~sent], reference["w"][~sent])
    assert torch.equal(got["steps"], trained["steps"])
    # Next round nothing new was trained: the residual alone goes out, a quarter at a time.
    total = {k: v.clone() for k, v in got.items()}
    for _ in range(3):
        again = decode_update(encoder.encode(reference, reference), reference)
        for k in ("w", "b"):
            total[k] += again[k] - reference[k]
    torch.testing.assert_close(total["w"], trained["w"])
    torch.testing.assert_close(total["b"], trained["b"])


def test_an_update_on_another_reference_is_refused() -> None:
    data = UpdateEncoder().encode(_drift(_model(), 1), _model())
    with pytest.raises(WireError, match="another reference") as info:
        decode_update(data, _model(1))
    assert info.value.reason == "bad_tensor"
    with pytest.raises(WireError) as info:
        decode_update(pack(["p2pfl.state_update", 2, b"x", b""]), _model())
    assert info.value.reason == "bad_version"
    dense = encode(_model(), "fp32")
    with pytest.raises(WireError, match="not a sparse update"):
        decode_update(pack(["p2pfl.state_update", 1, state_digest(_model()), dense]), _model())


def test_a_message_that_cannot_be_reconstructed_is_a_counted_message_error() -> None:
    from p2pfl.protocols import MessageError, decode_message

    sender, receiver = DeltaEncoder(), DeltaDecoder()
    sender.encode(_model())  # the keyframe is lost
    body = {"weights": sender.encode(_drift(_model(), 1)), "age": 2, "samples": 10}
    with pytest.raises(MessageError) as info:
        decode_message("gossip.model", body, receiver.decode)
    assert info.value.reason == "bad_weights"  # what the driver counts as a drop

"""``codec`` is one setup key: applied by the virtual engine, written into every daemon's
configuration by the processes engine, read by the daemon, and refused (``topk``) by all three
with the same reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from p2pfl.daemon import node as daemon_node
from p2pfl.daemon.config import ConfigError, load_config, parse_config
from p2pfl.learning.codecs import (
    CODECS,
    REFUSED,
    LinkCodecs,
    codec_problem,
    decode_model,
    encode_model,
)
from p2pfl.learning.setup import SetupError, parse_setup
from p2pfl.sim import processes, virtual
from p2pfl.sim.results import SetupResult
from p2pfl.sim.scenario import ScenarioError, parse_scenario

PROTOCOLS = ("fedavg", "gossip", "server-free")


def _scenario(codec: str | None, *, task: str = "digits", nodes: int = 4) -> Any:
    extra = {} if codec is None else {"codec": codec}
    return parse_scenario(
        {
            "name": "codec",
            "seed": 1,
            "task": {"name": task, "nodes": nodes, "partition": "iid"},
            "training": {"epochs": 1.0, "samples_per_s": 250.0, "eval_interval": 5.0},
            "network": {"latency_ms": 5.0, "bandwidth_mbps": 10.0},
            "stop": {"time": 1000.0, "rounds": 5},
            "setup": [
                {"name": "fedavg", "protocol": "fedavg", "round_timeout": 20.0, **extra},
                {"name": "gossip", "protocol": "gossip", "period": 2.0, **extra},
                {"name": "server-free", "protocol": "server-free", "round_timeout": 20.0, **extra},
            ],
        },
        "codec.toml",
    )


def _payload_per_message(setup: SetupResult) -> float:
    messages = sum(int(n.extra["messages_sent"]) for n in setup.nodes)
    return (setup.bytes_sent - virtual.ENVELOPE_OVERHEAD * messages) / messages


@pytest.fixture(scope="module")
def fp32() -> dict[str, SetupResult]:
    return {s.name: s for s in virtual.run(_scenario(None)).setups}


@pytest.mark.slow
@pytest.mark.parametrize(
    ("codec", "fewer_bytes", "tolerance"),
    [
        ("fp32", (1.0, 1.0), 0.0),  # written out: the same as leaving the key out
        ("fp16", (1.99, 2.01), 0.01),
        ("bf16", (1.99, 2.01), 0.02),
        ("int8", (3.98, 4.0), 0.02),
    ],
)
def test_each_codec_shrinks_the_bytes_and_keeps_the_accuracy_of_fp32(
    fp32: dict[str, SetupResult],
    codec: str,
    fewer_bytes: tuple[float, float],
    tolerance: float,
) -> None:
    """The digits MLP (69 KB), 4 nodes, 5 rounds per protocol: each message's tensor bytes shrink
    by the codec's factor (int8 adds one scale per tensor), the totals with them, and accuracy
    stays within ``tolerance`` of fp32."""
    results = {s.name: s for s in virtual.run(_scenario(codec)).setups}
    for name in PROTOCOLS:
        got, base = results[name], fp32[name]
        low, high = fewer_bytes
        ratio = _payload_per_message(base) / _payload_per_message(got)
        assert low <= ratio <= high, (name, ratio)
        assert base.bytes_sent / got.bytes_sent > 0.98 * low, name  # envelopes: 160 B each
        assert abs(got.final["accuracy"] - base.final["accuracy"]) <= tolerance, name
        assert got.final["accuracy"] > 0.8, name
        assert got.extra.get("codec") == (None if codec == "fp32" else codec)


def test_receivers_get_the_decoded_model_and_fp32_passes_it_as_it_is() -> None:
    run = virtual._SetupRun(_scenario("int8"), _scenario("int8").setups[0], _workload(), None)
    weights = {"w": torch.linspace(-1.0, 1.0, 300).reshape(30, 10), "b": torch.ones(10)}
    carried, payload = run.codec.encode(LinkCodecs("int8"), "n001", weights)
    received = run.codec.decode(LinkCodecs("int8"), "n000", carried)
    expected = decode_model(encode_model(weights, "int8"))
    assert all(torch.equal(received[k], expected[k]) for k in weights)
    assert not torch.equal(received["w"], weights["w"])  # quantised, as a daemon would receive it
    # One byte per value; per tensor, a float64 scale where fp32 has nil (+8 B) and the name
    # of the encoding, "int8", one letter longer than fp32's "raw" (+1 B).
    assert payload == 310 + 2 * (8 + 1)
    # fp32 is lossless: passing the model as it is is what encoding and decoding would give.
    again = decode_model(encode_model(weights, "fp32"))
    assert all(torch.equal(again[k], weights[k]) for k in weights)
    fp32 = virtual._Codec("fp32", _workload())
    assert fp32.encode(LinkCodecs("fp32"), "n001", weights) == (weights, 310 * 4)


def test_a_flat_parameter_vector_travels_as_one_tensor() -> None:
    vector = np.linspace(-1.0, 1.0, 650).astype(np.float32)
    codec = virtual._Codec("fp16", _workload())
    carried, payload = codec.encode(LinkCodecs("fp16"), "b", vector)
    received = codec.decode(LinkCodecs("fp16"), "a", carried)
    assert isinstance(received, np.ndarray) and received.dtype == np.float32
    assert payload == 650 * 2 + 1  # "fp16" is one letter longer than "raw"
    assert np.allclose(received, vector, atol=1e-3)
    assert not np.array_equal(received, vector)


def test_a_model_the_receiver_cannot_decode_is_a_counted_drop_in_the_virtual_engine() -> None:
    from p2pfl.protocols import GossipModel

    scenario = _scenario("int8")
    run = virtual._SetupRun(scenario, scenario.setups[1], _workload(), None)
    dst = run.nodes[1]
    dst.links = LinkCodecs("int8")
    hostile = GossipModel(weights=b"\x93\x01\x02", age=1, samples=10)
    run.dispatch(virtual._DELIVER, 1, -1, (run.ids[0], hostile, 200))
    assert dst.dropped == {"bad_weights": 1}  # as the daemon's driver counts it


class _Workload:
    """What ``_Codec`` and the set-up of ``_SetupRun`` read of a workload."""

    task = None

    def nbytes(self, weights: Any) -> int:
        if isinstance(weights, np.ndarray):
            return int(weights.nbytes)
        return sum(t.numel() * t.element_size() for t in weights.values())


def _workload() -> Any:
    return _Workload()


class _Addresses:
    def __init__(self, n: int) -> None:
        self.addresses = [f"10.77.0.{i + 2}" for i in range(n)]


@pytest.mark.parametrize("codec", CODECS)
def test_the_processes_engine_writes_the_setups_codec_into_every_daemon_config(
    codec: str, tmp_path: Path
) -> None:
    scenario = _scenario(codec, nodes=3)
    for setup in scenario.setups:
        assert setup.learning is not None and setup.learning.codec == codec
        spec = processes._cluster_spec(scenario, setup)
        with processes.DaemonCluster(tmp_path / setup.name, spec, _Addresses(3)) as cluster:
            for node in cluster.nodes:
                config = load_config(node.config_path)
                assert config.protocol.codec == codec, setup.name
                assert daemon_node.learner_setup(config).codec == codec, setup.name


def _daemon_config(tmp_path: Path, codec: str) -> str:
    text = f'[trust]\nmode = "open"\n\n[protocol]\nname = "gossip"\ncodec = "{codec}"\n'
    path = tmp_path / "p2pfl.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    return str(caught.value)


@pytest.mark.parametrize("codec", ["topk", "fp8", "INT8"])
def test_a_codec_is_refused_by_scenarios_the_daemon_and_the_factory_with_the_same_reason(
    codec: str, tmp_path: Path
) -> None:
    reason = codec_problem(codec)
    assert reason is not None
    if codec == "topk":
        assert reason == REFUSED["topk"]
        assert "destroys learning" in reason and "results/codecs" in reason and '"int8"' in reason
    with pytest.raises(ScenarioError) as scenario_error:
        _scenario(codec)
    assert str(scenario_error.value) == f"codec.toml: setup[0].codec: {reason}"
    daemon_error = _daemon_config(tmp_path, codec)
    assert daemon_error == f"{tmp_path / 'p2pfl.toml'}:6: protocol.codec: {reason}"
    with pytest.raises(SetupError) as setup_error:
        parse_setup({"protocol": "gossip", "codec": codec})
    assert (setup_error.value.key, setup_error.value.problem) == ("codec", reason)
    with pytest.raises(ValueError, match="codec"):
        encode_model({"w": torch.zeros(3)}, codec)


def test_a_centralized_setup_refuses_a_codec() -> None:
    data = {
        "name": "c",
        "task": {"name": "digits", "nodes": 2},
        "stop": {"time": 10.0},
        "setup": [{"name": "c", "protocol": "centralized", "codec": "int8"}],
    }
    with pytest.raises(ScenarioError, match=r"setup\[0\]\.codec: centralized training sends no"):
        parse_scenario(data, "c.toml")


def test_a_model_the_codec_cannot_carry_is_not_sent_and_is_counted() -> None:
    from p2pfl.protocols import GossipModel

    scenario = _scenario("fp16")
    run = virtual._SetupRun(scenario, scenario.setups[1], _workload(), None)
    src = run.nodes[0]
    src.links = LinkCodecs("fp16")
    too_large = {"w": torch.full((3,), 1e6)}  # past fp16's 65504: the daemon counts it too
    run.send(src, run.ids[1], GossipModel(weights=too_large, age=1, samples=10))
    assert src.messages_lost == {"unencodable": 1} and src.bytes_sent == 0
    assert run.heap == []


def test_topk_links_in_the_engine_heal_after_losses_and_restarts() -> None:
    """The refused codec's engine path, as benchmarks/bench_codecs.py measures it: with message
    loss and churn, a lost delta makes the link's next deltas undecodable (counted drops, never
    a crash) until a keyframe; a restarted node's links start over with a keyframe."""
    from unittest import mock

    from p2pfl.learning import codecs

    raw = {
        "name": "topk",
        "seed": 3,
        "task": {"name": "digits", "nodes": 4, "partition": "iid"},
        "training": {"epochs": 0.2, "samples_per_s": 500.0, "eval_interval": 5.0},
        "network": {"latency_ms": 5.0, "bandwidth_mbps": 10.0, "loss": 0.1},
        "churn": {"fraction": 0.25, "start": 5.0, "end": 10.0, "downtime": 5.0},
        "stop": {"time": 60.0},
        "setup": [{"name": "gossip", "protocol": "gossip", "period": 1.0}],
    }
    with mock.patch.multiple(codecs, CODECS=(*codecs.CODECS, "topk"), REFUSED={}):
        fp32 = parse_scenario(raw, "topk.toml")
        raw["setup"][0]["codec"] = "topk"
        topk = parse_scenario(raw, "topk.toml")
    (base,) = virtual.run(fp32).setups
    (got,) = virtual.run(topk).setups
    lost = sum(sum(n.extra["messages_lost"].values()) for n in got.nodes)
    undecodable = sum(n.extra["dropped"].get("bad_weights", 0) for n in got.nodes)
    assert lost > 0 and undecodable > 0
    assert sum(n.extra["sessions"] for n in got.nodes) > len(got.nodes)  # someone restarted
    assert got.bytes_sent < 0.2 * base.bytes_sent  # keyframes on 12 links, the rest deltas
    # Models keep arriving and are learned from (fp32 0.93 here, top-k 0.85).
    assert got.final["accuracy"] > 0.75

"""Halo readings: split files, owners serve theirs, requesters check, store and train on them."""

from __future__ import annotations

import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from click.testing import CliRunner

from p2pfl.cli import main as cli_main
from p2pfl.daemon.driver import NodeState, PeerState, ProtocolDriver
from p2pfl.daemon.drops import DropLog
from p2pfl.identity import NodeIdentity
from p2pfl.learning.features import (
    HaloStore,
    check_readings,
    decode_readings,
    encode_readings,
    feature_plan,
)
from p2pfl.learning.ops import StateDictOps
from p2pfl.ml.forecast import TrafficTask
from p2pfl.ml.readings import ReadingsError
from p2pfl.protocols import (
    FeaturePlan,
    FeatureReply,
    MessageReceived,
    PeerUp,
    ServerFreeLearner,
    Start,
)
from p2pfl.wire import EnvelopeVerifier, seal

IDS = [f"node-{i}" for i in range(7)]


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    result = CliRunner().invoke(cli_main, ["data", "split", "--synthetic", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _cloudlet(split: Path, c: int, path: Path | None = None) -> TrafficTask:
    return TrafficTask(readings=path or split / f"cloudlet-{c}.npz", cloudlet=c, days=2)


def test_split_files_hold_only_each_cloudlets_own_sensors(split: Path) -> None:
    full = TrafficTask(days=2)
    for c in range(7):
        with np.load(split / f"cloudlet-{c}.npz") as f:
            ids, speeds = list(f["sensor_ids"]), f["speeds"]
        members = full.partition.members[c]
        assert ids == [full.graph.sensor_ids[i] for i in members]
        truth = np.nan_to_num(full.windows.raw[:, members])
        assert np.allclose(speeds, truth, atol=1e-4)


def test_a_cloudlet_given_another_cloudlets_sensors_uses_only_its_own(
    split: Path, tmp_path: Path
) -> None:
    full = TrafficTask(days=2)
    both = tmp_path / "both.npz"
    members = np.concatenate([full.partition.members[0], full.partition.members[1]])
    np.savez(
        both,
        speeds=np.nan_to_num(full.windows.raw[:, members]),
        sensor_ids=np.array([full.graph.sensor_ids[i] for i in members]),
    )
    task = _cloudlet(split, 0, both)
    assert len(task.ignored_sensors) == len(full.partition.members[1])
    held = ~np.isnan(task.windows.raw).all(axis=0)
    assert set(np.flatnonzero(held)) == set(full.partition.members[0].tolist())
    with pytest.raises(ReadingsError, match="cloudlet 1 have no readings"):
        _cloudlet(split, 1, split / "cloudlet-0.npz")


def test_wire_form_and_its_check() -> None:
    values = np.array([[50.0, np.nan], [60.5, 70.0]], dtype=np.float32)
    data = encode_readings(values)
    assert check_readings(2, (1, 2), data) is None
    back = decode_readings(2, (1, 2), data)
    assert np.isnan(back[0, 1]) and back[1, 0] == pytest.approx(60.5)
    assert check_readings(3, (1, 2), data) == "features_wrong_length"
    nan = np.frombuffer(data, dtype="<f4").copy()
    nan[0] = np.nan
    assert check_readings(2, (1, 2), nan.tobytes()) == "features_not_finite"
    nan[0] = 1e6
    assert check_readings(2, (1, 2), nan.tobytes()) == "features_out_of_range"


def _exchange(split: Path, owner_files: dict[int, Path] | None = None) -> TrafficTask:
    """Cloudlet 0 gets its halo from owners holding ``owner_files`` (default: their split)."""
    requester = _cloudlet(split, 0)
    plan = feature_plan(requester, 0, IDS)
    assert plan is not None and plan.check is not None
    store = HaloStore(requester, 0, plan, lambda data: None)
    for peer, sensors in plan.needs.items():
        c = IDS.index(peer)
        owner = _cloudlet(split, c, (owner_files or {}).get(c))
        owner_plan = feature_plan(owner, c, IDS)
        assert owner_plan is not None and owner_plan.source is not None
        data = owner_plan.source(sensors)
        assert data is not None and plan.check(sensors, data) is None
        store.use(peer, sensors, data)
    assert store.status()["masked_sensors"] == 0
    return requester


def _train_once(task: TrafficTask) -> dict[str, torch.Tensor]:
    model = task.make_model()
    task.train(model, task.node_data(0, 7), epochs=0.05)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_the_requester_trains_on_what_its_owners_sent(split: Path, tmp_path: Path) -> None:
    full = TrafficTask(days=2)
    halo = full.partition.halos[0]
    honest = _exchange(split)
    assert np.allclose(
        np.nan_to_num(honest.windows.raw[:, halo]), np.nan_to_num(full.windows.raw[:, halo])
    )
    # An owner serving altered values (its file +10 mph): the requester's halo holds exactly
    # those, and its training differs from the honest one.
    plan = feature_plan(honest, 0, IDS)
    assert plan is not None
    c = IDS.index(sorted(plan.needs)[0])
    with np.load(split / f"cloudlet-{c}.npz") as f:
        speeds, ids = f["speeds"], f["sensor_ids"]
    altered = tmp_path / "altered.npz"
    np.savez(altered, speeds=np.where(speeds > 0, speeds + 10.0, 0.0), sensor_ids=ids)
    lying = _exchange(split, {c: altered})
    theirs = list(plan.needs[IDS[c]])
    assert np.allclose(
        np.nan_to_num(lying.windows.raw[:, theirs]),
        np.nan_to_num(honest.windows.raw[:, theirs] + 10.0),
        atol=1e-4,
    )
    honest_x = next(iter(honest.node_data(0, 7).train_set.in_order(8)))[0]
    lying_x = next(iter(lying.node_data(0, 7).train_set.in_order(8)))[0]
    assert not torch.equal(honest_x, lying_x)
    a, b = _train_once(honest), _train_once(lying)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_put_readings_takes_only_the_halo(split: Path) -> None:
    task = _cloudlet(split, 0)
    own = int(task.partition.members[0][0])
    with pytest.raises(ValueError, match="halo"):
        task.put_readings([own], np.zeros((task.windows.raw.shape[0], 1), dtype=np.float32))


async def test_bad_replies_through_the_driver_are_dropped_and_counted(split: Path) -> None:
    """Signed replies with unknown ids, the wrong length, NaN or from a non-owner: each dropped
    with its reason in the DropLog against its sender; the halo stays masked; a good one is
    stored and swaps the trainer's data."""
    me, others = NodeIdentity.generate(), [NodeIdentity.generate() for _ in range(6)]
    ids = [me.node_id] + [o.node_id for o in others]
    task = _cloudlet(split, 0)
    plan = feature_plan(task, 0, ids)
    assert plan is not None
    swapped: list[object] = []
    store = HaloStore(task, 0, plan, swapped.append)
    machine = ServerFreeLearner(me.node_id, {}, StateDictOps(), random.Random(0), features=plan)
    drops, state = DropLog(), NodeState()
    driver = ProtocolDriver(
        machine,
        identity=me,
        sink=_Sink(),
        trainer=None,  # type: ignore[arg-type]
        encode_weights=lambda peer, sd: b"",
        decode_weights=lambda peer, data: {},
        state=state,
        verifier=EnvelopeVerifier(is_trusted=lambda key: True, own_key=me.public_key),
        drops=drops,
        features=store,
    )
    async with trio.open_nursery() as nursery:
        driver._nursery = nursery
        await _exchange_through(driver, plan, ids, others, task, store, swapped, drops)


class _Sink:
    def __init__(self) -> None:
        self.sent: list[str] = []

    async def send(self, peer: str, data: bytes) -> None:
        self.sent.append(peer)


async def _exchange_through(
    driver: ProtocolDriver,
    plan: FeaturePlan,
    ids: list[str],
    others: list[NodeIdentity],
    task: TrafficTask,
    store: HaloStore,
    swapped: list[object],
    drops: DropLog,
) -> None:
    state = driver.state
    by_id = {o.node_id: o for o in others}
    owners = sorted(plan.needs)
    assert len(owners) >= 2
    first, second = owners[0], owners[1]
    non_owner = next(i for i in ids[1:] if i not in plan.needs)
    for peer in ids[1:]:
        state.peers[peer] = PeerState(peer)
        await driver._handle(PeerUp(peer))
    await driver._handle(Start())
    steps = task.windows.raw.shape[0]
    sensors = plan.needs[first]
    good = encode_readings(np.full((steps, len(sensors)), 55.0, dtype=np.float32))
    seq = iter(range(1, 100))

    async def send(sender: str, reply: FeatureReply) -> None:
        body = reply.to_body()
        frame = seal(by_id[sender], kind=reply.KIND, body=body, seq=next(seq), now=time.time())
        message = await driver._open(sender, frame)
        assert message is not None
        await driver._handle(MessageReceived(sender, message))

    await send(first, FeatureReply((*sensors[:-1], 10_000), good))  # unknown id
    await send(first, FeatureReply(sensors, good[:-4]))  # wrong length
    await send(second, FeatureReply(plan.needs[second], _nan_reply(steps, plan.needs[second])))
    await send(non_owner, FeatureReply(sensors, good))  # owns none of the halo
    snapshot = drops.snapshot()
    assert snapshot["update/features_unknown_sensor"] == 1
    assert snapshot["update/features_wrong_length"] == 1
    assert snapshot["update/features_not_finite"] == 1
    assert snapshot["update/features_not_owner"] == 1
    assert drops.peer_totals(non_owner) == {"update": 1}
    assert store.received == {} and swapped == []
    await send(first, FeatureReply(sensors, good))
    assert list(store.received) == [first] and len(swapped) == 1
    assert np.allclose(task.windows.raw[:, list(sensors)], 55.0)
    status = store.status()
    assert status["masked_sensors"] == status["sensors"] - len(sensors)


def _nan_reply(steps: int, sensors: tuple[int, ...]) -> bytes:
    values = np.full((steps, len(sensors)), 50.0, dtype="<f4")
    values[0, 0] = np.nan
    return values.tobytes()


def test_split_reads_the_published_layouts_and_refuses_bad_files(tmp_path: Path) -> None:
    full = TrafficTask(days=2)
    speeds = np.nan_to_num(full.windows.raw)
    source = tmp_path / "metr-la.csv"
    lines = ["time," + ",".join(full.graph.sensor_ids)]
    start, step = np.datetime64("2012-03-01T00:00"), np.timedelta64(5, "m")
    lines += [
        f"{start + t * step}," + ",".join(f"{v:.3f}" for v in row) for t, row in enumerate(speeds)
    ]
    source.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    runner = CliRunner()
    result = runner.invoke(cli_main, ["data", "split", str(source), "--out", str(out)])
    assert result.exit_code == 0, result.output
    for c in (0, 4):
        with np.load(out / f"cloudlet-{c}.npz") as f:
            members = full.partition.members[c]
            assert np.allclose(f["speeds"], speeds[:, members], atol=1e-3)
    again = runner.invoke(cli_main, ["data", "split", str(source), "--out", str(out)])
    assert again.exit_code == 2 and "already there" in again.output
    bad = tmp_path / "bad.npz"
    np.savez(bad, speeds=np.zeros((400, 100)))  # 100 columns, no ids: not the graph's 207
    refused = runner.invoke(cli_main, ["data", "split", str(bad), "--out", str(tmp_path / "b")])
    assert refused.exit_code == 4 and "bad.npz" in refused.output

"""Live operation in one process: two cloudlets' replay sources, pushes, forecasts, drops."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from p2pfl.cli import main as cli_main
from p2pfl.daemon.drops import DropLog
from p2pfl.daemon.live import LIVE_KIND, LiveFeed, LiveMessage
from p2pfl.daemon.metrics import NodeMetrics
from p2pfl.learning.features import feature_plan
from p2pfl.ml.forecast import TrafficTask

IDS = [f"node-{i}" for i in range(7)]
REQUESTER, OWNER, SILENT = 0, 6, 3


@pytest.fixture(scope="module")
def split(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("split")
    result = CliRunner().invoke(cli_main, ["data", "split", "--synthetic", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def _feed(split: Path, c: int, drops: DropLog, speed: float = 400.0) -> LiveFeed:
    task = TrafficTask(readings=split / f"cloudlet-{c}.npz", cloudlet=c, days=2)
    plan = feature_plan(task, c, IDS)
    assert plan is not None
    weights = task.make_model().state_dict()
    return LiveFeed(task, c, plan.needs, IDS, speed=speed, drops=drops, model=lambda: weights)


def _wire(feeds: dict[str, LiveFeed]) -> Any:
    def sender(me: str) -> Any:
        async def send(peer: str, message: LiveMessage) -> None:
            if peer in feeds:
                feeds[peer].received(me, LIVE_KIND, message.to_body())

        return send

    return sender


async def test_owner_pushes_each_step_and_the_requester_forecasts_and_scores(split: Path) -> None:
    drops = DropLog()
    requester, owner = _feed(split, REQUESTER, drops), _feed(split, OWNER, drops)
    feeds = {IDS[REQUESTER]: requester, IDS[OWNER]: owner}
    sender = _wire(feeds)
    requester.peer_up(IDS[OWNER])  # subscribes to the owner; the silent owner never comes up
    requester.peer_up(IDS[SILENT])
    await requester._subscribe_owners(sender(IDS[REQUESTER]))
    # The owner replays first, so every step is there before the requester forecasts with it
    # (with both running, a requester ahead of its owner forecasts from the readings so far).
    await owner.run(sender(IDS[OWNER]))
    await requester.run(sender(IDS[REQUESTER]))
    assert owner.subscribers == {IDS[REQUESTER]: requester.needs[IDS[OWNER]]}
    steps = requester.steps - requester.start
    assert owner.pushes_sent == steps and requester.pushes_received == steps
    # Incremental frames: every push held one step of the subscribed sensors, which the
    # requester now holds exactly as the owner read them.
    theirs = list(requester.needs[IDS[OWNER]])
    columns = [requester.column[s] for s in theirs]
    truth = owner.task.windows.raw[requester.start :, theirs]
    assert np.allclose(
        np.nan_to_num(requester.pushed[requester.start :, columns]), np.nan_to_num(truth)
    )
    status = requester.status()
    assert status["finished"] and status["scored"]["60"] > 0
    mae = status["mae"]
    assert all(mae[h] is not None and 0 < mae[h] < 100 for h in ("15", "30", "60"))
    assert status["halo_age_s"][IDS[OWNER]] is not None
    assert status["halo_age_s"][IDS[SILENT]] is None
    # The silent owner's sensors are masked in every live forecast, visibly.
    silent = len(requester.needs[IDS[SILENT]])
    assert status["masked_inputs"] == silent
    reply = requester.forecast_reply(None)
    assert reply["masked"] and len(reply["sensors"]) == len(requester.own)
    assert all(np.isfinite(v).all() for v in reply["sensors"].values())
    one = requester.task.graph.sensor_ids[requester.own[0]]
    assert list(requester.forecast_reply(one)["sensors"]) == [one]
    with pytest.raises(ValueError, match="not one of this cloudlet"):
        requester.forecast_reply(owner.task.graph.sensor_ids[owner.own[0]])
    metrics = NodeMetrics()
    requester.export(metrics)
    rendered = metrics.render().decode()
    assert 'p2pfl_forecast_mae_mph{horizon="60"}' in rendered
    assert f'p2pfl_halo_age_seconds{{owner="{IDS[OWNER]}"}}' in rendered
    assert sum(drops.snapshot().values()) == 0


def test_hostile_live_messages_are_dropped_and_counted(split: Path) -> None:
    drops = DropLog()
    requester = _feed(split, REQUESTER, drops)
    owner_id = IDS[OWNER]
    sensors = requester.needs[owner_id]
    good = np.full(len(sensors), 50.0, dtype="<f4").tobytes()
    step = requester.start
    cases = [
        (owner_id, "not a dict", "live_malformed"),
        (owner_id, {"live": "push", "sensors": ["x"]}, "live_malformed"),
        (IDS[1], LiveMessage(sensors, step, good).to_body(), "live_not_owner"),
        (owner_id, LiveMessage(sensors[:1], step, good[:4]).to_body(), "live_wrong_sensors"),
        (owner_id, LiveMessage(sensors, 10**9, good).to_body(), "live_bad_step"),
        (owner_id, LiveMessage(sensors, step, good[:-4]).to_body(), "live_wrong_length"),
        (
            owner_id,
            LiveMessage(sensors, step, np.full(len(sensors), np.nan, "<f4").tobytes()).to_body(),
            "live_bad_values",
        ),
        # Subscriptions: only to sensors this cloudlet owns and the subscriber's halo holds.
        (owner_id, LiveMessage(sensors).to_body(), "live_subscribe_refused"),
        ("stranger", LiveMessage((requester.own[0],)).to_body(), "live_not_a_cloudlet"),
    ]
    for peer, body, reason in cases:
        before = drops.snapshot().get(f"update/{reason}", 0)
        requester.received(peer, LIVE_KIND, body)
        assert drops.snapshot().get(f"update/{reason}", 0) == before + 1, reason
    assert requester.pushes_received == 0 and requester.subscribers == {}
    requester.received(owner_id, LIVE_KIND, LiveMessage(sensors, step, good).to_body())
    assert requester.pushes_received == 1
    replayed = LiveMessage(sensors, step, good).to_body()
    requester.received(owner_id, LIVE_KIND, replayed)  # the same step again
    assert drops.snapshot()["update/live_old_step"] == 1

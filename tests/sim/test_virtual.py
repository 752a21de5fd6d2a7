"""The virtual engine: determinism, learning, churn, loss and partitions behave."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from p2pfl.sim import virtual
from p2pfl.sim.results import load_results, to_json, write_results
from p2pfl.sim.scenario import Scenario

Tiny = Callable[..., Scenario]


def by_name(results: virtual.Results) -> dict[str, virtual.SetupResult]:
    return {s.name: s for s in results.setups}


@pytest.mark.slow
def test_same_scenario_and_seed_give_identical_results_files(tiny: Tiny, tmp_path: Path) -> None:
    scenario = tiny(
        network={"loss": 0.1}, churn={"fraction": 0.34, "start": 5.0, "end": 15.0, "downtime": 6.0}
    )
    first, second = virtual.run(scenario), virtual.run(scenario)
    write_results(first, tmp_path / "a", include_wall=False)
    write_results(second, tmp_path / "b", include_wall=False)
    for name in ("results.json", "results.csv", "summary.csv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    other = virtual.run(tiny(seed=4, network={"loss": 0.1}))
    assert to_json(other, include_wall=False) != to_json(first, include_wall=False)


@pytest.mark.slow
def test_every_protocol_learns_the_task(tiny: Tiny) -> None:
    results = virtual.run(tiny())
    initial = {s.name: s.curve[0]["accuracy"] for s in results.setups}
    for setup in results.setups:
        assert setup.final["accuracy"] > 0.8, setup.name
        assert setup.final["accuracy"] > initial[setup.name] + 0.5
        assert setup.bytes_sent > 0 and len(setup.nodes) == 6
        assert all(n.bytes_received <= n.bytes_sent * 6 for n in setup.nodes)


def test_churned_nodes_leave_rejoin_and_still_converge(tiny: Tiny) -> None:
    churn = {"fraction": 0.34, "start": 5.0, "end": 10.0, "downtime": 8.0}
    results = by_name(virtual.run(tiny(churn=churn)))
    for setup in results.values():
        sessions = sorted(n.extra["sessions"] for n in setup.nodes)
        assert sessions == [1, 1, 1, 1, 2, 2], setup.name
        assert all(n.extra["alive"] for n in setup.nodes)
        assert setup.final["accuracy"] > 0.8, setup.name
    # Messages to nodes that were away are lost, and the senders count it.
    lost = sum(n.extra["messages_lost"].get("receiver_down", 0) for n in results["gossip"].nodes)
    assert lost > 0


def test_rounds_of_rejoined_nodes_are_not_counted_twice(tiny: Tiny) -> None:
    churn = {"fraction": 0.34, "start": 5.0, "end": 10.0, "downtime": 4.0}
    results = by_name(virtual.run(tiny(churn=churn, stop={"time": 200.0, "rounds": 12})))
    assert all(n.rounds == 12 for n in results["server-free"].nodes)
    assert all(n.rounds >= 12 for n in results["gossip"].nodes)
    assert all(n.history[-1]["round"] == n.rounds for n in results["gossip"].nodes)
    # Finished early: the run stops when every node is done, not at stop.time.
    assert results["server-free"].virtual_time_s is not None
    assert results["server-free"].virtual_time_s < 100.0


def test_message_loss_is_counted_and_learning_survives_it(tiny: Tiny) -> None:
    results = by_name(virtual.run(tiny(network={"loss": 0.2})))
    for setup in results.values():
        lost = sum(n.extra["messages_lost"].get("loss", 0) for n in setup.nodes)
        sent = sum(n.extra["messages_sent"] for n in setup.nodes)
        assert 0.1 < lost / sent < 0.3, setup.name
        assert setup.final["accuracy"] > 0.8, setup.name


@pytest.mark.slow
def test_partition_blocks_traffic_then_heals(tiny: Tiny) -> None:
    partition = [{"start": 5.0, "end": 20.0, "groups": 2}]
    results = by_name(virtual.run(tiny(network={"partitions": partition})))
    fedavg = results["fedavg"]
    assert sum(n.extra["messages_lost"].get("partition", 0) for n in fedavg.nodes) > 0
    # Peers notice the split after detect_s (1 s) and gossip stops sampling across it: only the
    # first second or so of the 15 s partition loses messages (about half would otherwise).
    gossip_lost = sum(n.extra["messages_lost"].get("partition", 0) for n in results["gossip"].nodes)
    assert 0 < gossip_lost <= 12
    # After healing every FedAvg node follows one aggregator again: identical final models.
    assert len({round(n.final["accuracy"], 9) for n in fedavg.nodes}) == 1
    assert fedavg.final["accuracy"] > 0.8


def test_byte_budget_stops_each_setup_near_it(tiny: Tiny) -> None:
    results = virtual.run(tiny(stop={"time": 1000.0, "megabytes": 0.2}))
    for setup in results.setups:
        assert 0.2e6 <= setup.bytes_sent < 0.2e6 + 10_000, setup.name
        assert setup.virtual_time_s is not None and setup.virtual_time_s < 1000.0


def test_rounds_limit_finishes_every_node(tiny: Tiny) -> None:
    results = by_name(virtual.run(tiny(stop={"time": 1000.0, "rounds": 5})))
    assert all(n.rounds == 5 for n in results["gossip"].nodes)
    assert all(n.rounds == 5 for n in results["server-free"].nodes)


def test_centralized_baseline_trains_on_all_data(tiny: Tiny) -> None:
    setup = {"name": "central", "protocol": "centralized"}
    results = virtual.run(tiny(setup=[setup], stop={"time": 30.0}))
    central = results.setups[0]
    assert central.bytes_sent == 0 and central.final["accuracy"] > 0.85
    assert [p["round"] for p in central.curve] == list(range(len(central.curve)))


@pytest.mark.slow
def test_results_round_trip_and_plots(tiny: Tiny, tmp_path: Path) -> None:
    results = virtual.run(tiny(stop={"time": 10.0}))
    paths = write_results(results, tmp_path)
    names = {p.name for p in paths}
    assert {
        "results.json",
        "results.csv",
        "summary.csv",
        "metric_vs_time.png",
        "bytes_per_node.png",
        "metric_vs_bytes.png",
    } <= names
    assert (tmp_path / "metric_vs_time.png").read_bytes()[:4] == b"\x89PNG"
    assert to_json(load_results(tmp_path / "results.json")) == to_json(results)


def test_vectorized_logreg_scores_like_the_task_and_learns(tiny: Tiny) -> None:
    import torch

    from p2pfl.learning.ops import TaskWorkload
    from p2pfl.sim.vectorized import VectorizedLogReg

    scenario = tiny(training={"path": "vectorized"})
    vector, task = VectorizedLogReg(scenario), TaskWorkload(scenario)
    weights = vector.initial()
    for _ in range(3):
        weights, report = vector.train(None, weights, 1.0)
    assert report.samples == task.task.central_data().num_samples
    state = {
        "linear.weight": torch.from_numpy(weights[:640].reshape(10, 64).copy()),
        "linear.bias": torch.from_numpy(weights[640:].copy()),
    }
    ours, theirs = vector.evaluate(weights), task.evaluate(state)
    assert ours["accuracy"] == theirs["accuracy"] > 0.85
    assert abs(ours["loss"] - theirs["loss"]) < 1e-5


def test_vectorized_path_refuses_other_tasks(tiny: Tiny) -> None:
    from p2pfl.sim.scenario import ScenarioError
    from p2pfl.sim.vectorized import VectorizedLogReg

    with pytest.raises(ScenarioError, match=r"training\.path"):
        VectorizedLogReg(tiny(task={"name": "digits"}, training={"path": "vectorized"}))


def test_traffic_feature_plan_asks_halo_owners_for_real_readings(tiny: Tiny) -> None:
    from p2pfl.learning.ops import TaskWorkload

    scenario = tiny(task={"name": "traffic-metr-la", "nodes": 7, "options": {"days": 2}})
    workload = TaskWorkload(scenario)
    ids = virtual.node_ids(7)
    partition = workload.task.partition
    steps = workload.task.windows.truth.shape[0]
    for node in range(7):
        plan = workload.feature_plan(node, ids)
        assert plan is not None and plan.source is not None
        asked = sorted(s for sensors in plan.needs.values() for s in sensors)
        assert asked == sorted(int(s) for s in partition.halos[node])
        for owner, sensors in plan.needs.items():
            assert all(partition.owner[s] == ids.index(owner) for s in sensors)
        own = tuple(int(s) for s in partition.members[node][:3])
        assert len(plan.source(own) or b"") == 4 * steps * len(own)
        assert plan.source(tuple(int(s) for s in partition.halos[node][:1])) is None


def test_a_setups_results_do_not_depend_on_the_setups_before_it(
    tiny: Callable[..., Scenario],
) -> None:
    """Each setup draws its training shuffles from its own stream (seed and setup name)."""
    setups = [
        {"name": "gossip", "protocol": "gossip", "period": 1.0},
        {"name": "fedavg", "protocol": "fedavg", "round_timeout": 2.0},
    ]
    forward = virtual.run(tiny(setup=setups, stop={"time": 10.0}))
    backward = virtual.run(tiny(setup=setups[::-1], stop={"time": 10.0}))
    by_name = {s.name: s for s in backward.setups}
    for setup in forward.setups:
        assert setup.final == by_name[setup.name].final, setup.name
        assert setup.curve == by_name[setup.name].curve, setup.name


def test_virtual_cloudlets_follow_the_daemons_recipe(tiny: Tiny) -> None:
    # Each virtual cloudlet trains on the task a daemon builds (learning.ops.node_task): its own
    # sensors' readings, z-scored with their statistics, and a halo masked until its owners'
    # replies are stored; what they store is what the owner served.
    import numpy as np

    from p2pfl.learning.ops import TaskWorkload, node_task

    scenario = tiny(task={"name": "traffic-metr-la", "nodes": 7, "options": {"days": 2}})
    workload = TaskWorkload(scenario)
    ids = virtual.node_ids(7)
    plans = {n: workload.feature_plan(n, ids) for n in range(7)}
    partition = workload.task.partition
    node = 3
    daemon = node_task("traffic-metr-la", node, n_nodes=7, seed=scenario.seed, options={"days": 2})
    mine = workload.node_task(node)
    assert (mine.windows.mean, mine.windows.std) == (daemon.windows.mean, daemon.windows.std)
    assert mine.windows.mean != workload.task.windows.mean  # not all sensors' statistics
    halo = [int(s) for s in partition.halos[node]]
    assert np.isnan(np.asarray(mine.windows.raw)[:, halo]).all()
    x, _ = next(workload._node_data(node).train_set.in_order(4))
    assert (x[:, :, len(partition.members[node]) :] == 0).all()  # masked until owners answer
    plan = plans[node]
    assert plan is not None
    for peer, sensors in plan.needs.items():
        owner_plan = plans[ids.index(peer)]
        assert owner_plan is not None and owner_plan.source is not None
        data = owner_plan.source(sensors)
        assert data is not None
        workload.use_features(node, peer, sensors, data)
    stored = np.asarray(workload.node_task(node).windows.raw)[:, halo]
    full = np.asarray(workload.task.windows.raw)[:, halo]
    assert np.allclose(np.nan_to_num(stored), np.nan_to_num(full), atol=1e-4)
    n_own = len(partition.members[node])
    x, _ = next(workload._node_data(node).train_set.in_order(4))  # [batch, time, sensors, ...]
    assert (x[:, :, n_own:] != 0).any()  # halo inputs now present (masked ones are 0)
    # A new machine for the node (a rejoin, the next setup) starts masked again.
    workload.feature_plan(node, ids)
    assert np.isnan(np.asarray(workload.node_task(node).windows.raw)[:, halo]).all()


def test_a_virtual_run_stores_every_owners_readings(tiny: Tiny) -> None:
    from p2pfl.learning.ops import TaskWorkload

    scenario = tiny(
        task={"name": "traffic-metr-la", "nodes": 7, "options": {"days": 2}},
        training={"epochs": 0.01},
        stop={"time": 5.0, "rounds": 1},
        setup=[{"name": "server-free", "protocol": "server-free"}],
    )
    workload = TaskWorkload(scenario)
    results = virtual.run(scenario, workload=workload)
    assert len(results.setups) == 1
    for node in range(7):
        store = workload._halos[node]
        assert store.missing() == {}, node
        assert store.status()["masked_sensors"] == 0


def test_a_virtual_cloudlet_is_scored_as_its_daemon_scores_itself(tiny: Tiny) -> None:
    # A daemon scores a model on its own sensors (its task from ops.node_task, its data); the
    # virtual engine scores that node's model the same way, not on the whole graph with all
    # sensors' statistics, so the two engines report the same measure.
    from p2pfl.learning.ops import TaskWorkload, node_task

    scenario = tiny(task={"name": "traffic-metr-la", "nodes": 7, "options": {"days": 2}})
    workload = TaskWorkload(scenario)
    weights = workload.initial()
    node = 2
    daemon_task = node_task(
        "traffic-metr-la", node, n_nodes=7, seed=scenario.seed, options={"days": 2}
    )
    model = daemon_task.make_model()
    model.load_state_dict(weights)
    daemon_scores = daemon_task.evaluate(model, daemon_task.node_data(node, 7))
    scores = workload.evaluate(weights, node)
    assert scores == pytest.approx({k: float(v) for k, v in daemon_scores.items()})
    assert scores != workload.evaluate(weights)  # the whole task's measure differs

"""Claims cannot buy influence; robust merging is the default (issue 13, parts 1 and 2).

Exact actions on scripted scenarios, with a float clock and float models (``FloatOps``).
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Any

import pytest

from p2pfl.protocols import (
    OUTLIER_RULES,
    Adopt,
    FedAvgConfig,
    FedAvgLearner,
    GlobalModel,
    GossipConfig,
    GossipLearner,
    GossipModel,
    MessageReceived,
    Metric,
    PeerUp,
    Penalize,
    Send,
    ServerFreeConfig,
    ServerFreeLearner,
    SetTimer,
    Start,
    TimerFired,
    Train,
    TrainingDone,
)
from p2pfl.protocols import RoundUpdate as RU
from p2pfl.protocols._messages import MAX_ROUND

from .conftest import FloatOps, LegacyOps, Report

GOSSIP = GossipConfig(period=10.0, jitter=0.0, budget=2.0, max_age_lead=2, clip_scale=2.0)


def gossip(ops: Any, config: GossipConfig = GOSSIP, peers: tuple[str, ...] = ("b", "c")) -> Any:
    machine = GossipLearner("a", 1.0, ops, random.Random(7), config)
    for peer in peers:
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    return machine


def trained_once(ops: Any, config: GossipConfig = GOSSIP) -> tuple[Any, float]:
    """A gossip node that trained 1.0 -> 1.5 at its first tick (age 1); the next tick's time."""
    machine = gossip(ops, config)
    tick = machine.next_deadline()
    assert machine.handle(TimerFired(), tick) == [Train(1.0, 2.0), SetTimer(tick + 10.0)]
    machine.handle(TrainingDone(1.5, Report(5)), tick + 1)
    return machine, tick + 10.0


# -- part 1: ages, rounds and sample counts are bounded claims --------------------------------


def test_an_age_of_2_pow_53_is_a_counted_rejection_never_an_adoption() -> None:
    machine, tick = trained_once(FloatOps(max_distance=1e12))
    assert machine.handle(MessageReceived("b", GossipModel(-1e6, MAX_ROUND, 5)), tick - 1) == []
    assert machine.dropped["age_clamped"] == 1
    # The model counts at the age this node can check (its own, 1), clipped as any other:
    # own 1.5 and b's clipped to 1.5 - 1.0, equal weights. The age stays 1.
    assert machine.handle(TimerFired(), tick) == [
        Adopt(1.0),
        Train(1.0, 2.0),
        SetTimer(tick + 10.0),
    ]
    assert machine.age == 1


def test_a_peers_age_may_grow_by_the_ticks_elapsed_since_its_last_one(ops: Any) -> None:
    machine = gossip(ops)
    assert machine.age_bound("b", 1.0) == 2  # own age 0 + max_age_lead
    machine.handle(MessageReceived("b", GossipModel(2.0, 2, 5)), 1.0)
    # 30 s later: at most 3 ticks of 10 s (jitter 0) have passed for b, plus the lead.
    assert machine.age_bound("b", 31.0) == 2 + 3 + 2
    assert machine.handle(MessageReceived("b", GossipModel(2.0, 8, 5)), 31.0) == []
    # 8 is past the bound: the claim is clamped to the checkable 2 + 3 = 5.
    assert machine.dropped["age_clamped"] == 1 and machine.age_bound("b", 31.0) == 5 + 2
    assert machine.handle(MessageReceived("b", GossipModel(2.0, 7, 5)), 31.0) == []
    assert machine.dropped["age_clamped"] == 1 and machine.age_bound("b", 31.0) == 9


def test_one_peer_cannot_vouch_for_its_own_age(ops: Any) -> None:
    machine = gossip(ops)
    machine.handle(MessageReceived("b", GossipModel(2.0, 50, 5)), 1.0)
    machine.handle(MessageReceived("b", GossipModel(2.0, 51, 5)), 2.0)
    assert machine.dropped["age_clamped"] == 2
    # Counted at 0 (own age), then 1 (one tick later): its bound grows by ticks, not by claims.
    assert [age for _, _, age in machine._inbox] == [0, 1]
    assert machine.age_bound("b", 2.0) == 1 + 2
    # The same inflated claim again at once has no checkable age above the last: a duplicate.
    machine.handle(MessageReceived("b", GossipModel(2.0, 52, 5)), 2.0)
    assert machine.dropped["age_clamped"] == 3 and machine.dropped["duplicate"] == 1


def test_a_joiner_catches_up_once_a_second_peer_states_a_like_age(ops: Any) -> None:
    machine = gossip(ops)
    machine.handle(MessageReceived("b", GossipModel(2.0, 50, 5)), 1.0)
    assert machine.dropped["age_clamped"] == 1
    # c's claim is checked against b's: the upper median of (own 0, b 50) is 50.
    assert machine.age_bound("c", 1.5) == 52
    machine.handle(MessageReceived("c", GossipModel(3.0, 51, 5)), 1.5)
    machine.handle(MessageReceived("b", GossipModel(2.0, 52, 5)), 2.0)
    assert machine.dropped["age_clamped"] == 1
    actions = machine.handle(TimerFired(), machine.next_deadline())
    # The age catches up; the model waits for a first training to set the clipping radius.
    assert actions[0] == Adopt(1.0) and machine.age == 52


def test_a_participant_does_not_follow_a_higher_round_from_a_non_aggregator(ops: Any) -> None:
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean")
    machine = FedAvgLearner("c", 1.0, ops, random.Random(0), config)
    for peer in ("a", "b"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("a", GlobalModel(0, 2.0)), 1.0) == [
        Adopt(2.0),
        Train(2.0, 1.0),
    ]
    assert machine.handle(MessageReceived("b", GlobalModel(1000, 9.0)), 2.0) == []
    assert machine.handle(MessageReceived("b", GlobalModel(MAX_ROUND, 9.0)), 2.0) == []
    assert machine.dropped["not_aggregator"] == 2
    assert machine.round == 0 and machine.aggregator == "a" and machine.model == 2.0


def test_an_aggregator_that_closed_a_round_does_not_step_down_for_a_larger_id(ops: Any) -> None:
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean")
    machine = FedAvgLearner("a", 1.0, ops, random.Random(0), config)
    machine.handle(PeerUp("b"), 0.0)
    machine.handle(Start(), 0.0)
    machine.handle(TrainingDone(2.0, Report(5)), 1.0)
    machine.handle(TimerFired(), 5.0)  # round 0 closes with its own update
    assert machine.round == 1 and machine.is_aggregator
    assert machine.handle(MessageReceived("b", GlobalModel(7, 3.0)), 6.0) == []
    assert machine.dropped["not_aggregator"] == 1 and machine.is_aggregator


def test_the_configured_aggregator_takes_over_at_its_signed_round(ops: Any) -> None:
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean", aggregator="z")
    machine = FedAvgLearner("c", 1.0, ops, random.Random(0), config)
    machine.handle(PeerUp("a"), 0.0)
    machine.handle(Start(), 0.0)  # z is not up: the smallest id, a, aggregates
    machine.handle(MessageReceived("a", GlobalModel(3, 2.0)), 1.0)
    assert machine.handle(TrainingDone(2.5, Report(5)), 1.5) == [Send("a", RU(3, 2.5, 5))]
    machine.handle(PeerUp("z"), 2.0)
    assert machine.handle(MessageReceived("z", GlobalModel(4, 5.0)), 3.0) == [
        Adopt(5.0),
        Train(5.0, 1.0),
    ]
    assert machine.aggregator == "z" and machine.round == 4
    assert machine.handle(MessageReceived("a", GlobalModel(5, 2.0)), 3.5) == []
    assert machine.dropped["not_aggregator"] == 1


def test_a_fresh_participant_gives_the_chosen_aggregator_a_round_to_speak_first(
    ops: Any,
) -> None:
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean")
    machine = FedAvgLearner("c", 1.0, ops, random.Random(0), config)
    for peer in ("a", "m"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("m", GlobalModel(MAX_ROUND, 9.0)), 1.0) == []
    assert machine.dropped["not_aggregator"] == 1
    # a never speaks (it follows someone else): after a round_timeout the live round wins.
    assert machine.handle(MessageReceived("m", GlobalModel(40, 3.0)), 5.0) == [
        Adopt(3.0),
        Train(3.0, 1.0),
    ]
    assert machine.aggregator == "m" and machine.round == 40


def test_a_configured_live_aggregator_is_the_only_one_a_fresh_node_follows(ops: Any) -> None:
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean", aggregator="b")
    machine = FedAvgLearner("c", 1.0, ops, random.Random(0), config)
    for peer in ("a", "b"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    assert machine.handle(MessageReceived("a", GlobalModel(3, 9.0)), 60.0) == []
    assert machine.dropped["not_aggregator"] == 1 and machine.aggregator == "b"


def test_server_free_caps_a_stated_sample_count(report: Any) -> None:
    ops = FloatOps()
    config = ServerFreeConfig(round_timeout=5.0, aggregation="mean", max_sample_ratio=2.0)
    machine = ServerFreeLearner("a", 1.0, ops, random.Random(0), config)
    for peer in ("b", "c"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    machine.handle(TrainingDone(2.0, report(10)), 1.0)
    machine.handle(MessageReceived("b", RU(0, 4.0, 2**40)), 2.0)
    # Lower median of (10, 2**40, 10) is 10: b weighs 20, not 2**40. (20 + 80 + 80) / 40.
    assert machine.handle(MessageReceived("c", RU(0, 8.0, 10)), 3.0)[0] == Adopt(4.5)
    assert machine.dropped["samples_capped"] == 1


def test_fedavg_caps_a_stated_sample_count(report: Any) -> None:
    ops = FloatOps()
    config = FedAvgConfig(round_timeout=5.0, aggregation="mean", max_sample_ratio=3.0)
    machine = FedAvgLearner("a", 1.0, ops, random.Random(0), config)
    machine.handle(PeerUp("b"), 0.0)
    machine.handle(Start(), 0.0)
    machine.handle(TrainingDone(2.0, report(10)), 1.0)
    # Lower median of (10, 2**40) is 10: b weighs 30. (20 + 30 * 6) / 40 = 5.
    assert machine.handle(MessageReceived("b", RU(0, 6.0, 2**40)), 2.0)[0] == Adopt(5.0)
    assert machine.dropped["samples_capped"] == 1


def test_a_rule_that_does_not_weigh_caps_and_counts_nothing(report: Any) -> None:
    # The trimmed mean, the median and Krum count every input alike: a stated count decides
    # nothing there, so nothing is capped or counted as capped (under "mean" it is, above).
    for rule in ("trimmed_mean", "median", "krum"):
        config = FedAvgConfig(round_timeout=5.0, aggregation=rule)
        machine = FedAvgLearner("a", 1.0, FloatOps(), random.Random(0), config)
        for peer in ("b", "c"):
            machine.handle(PeerUp(peer), 0.0)
        machine.handle(Start(), 0.0)
        machine.handle(TrainingDone(2.0, report(10)), 1.0)
        machine.handle(MessageReceived("b", RU(0, 2.5, 2**40)), 2.0)
        assert isinstance(machine.handle(MessageReceived("c", RU(0, 3.0, 10)), 3.0)[0], Adopt)
        assert machine.dropped["samples_capped"] == 0, rule


@pytest.mark.parametrize("config_cls", [ServerFreeConfig, FedAvgConfig])
def test_a_sample_cap_below_one_is_refused(config_cls: Any) -> None:
    learner_cls = ServerFreeLearner if config_cls is ServerFreeConfig else FedAvgLearner
    with pytest.raises(ValueError, match="max_sample_ratio"):
        learner_cls("a", 1.0, FloatOps(), random.Random(0), config_cls(max_sample_ratio=0.5))


def test_gossip_has_no_sample_cap() -> None:
    # Gossip weighs models by age; a sample cap there would be a key with no effect.
    assert "max_sample_ratio" not in {f.name for f in dataclasses.fields(GossipConfig)}


# -- part 2: robust merging by default --------------------------------------------------------


def test_defaults_are_clip_for_every_protocol_centred_clipping_for_rounds() -> None:
    assert GossipConfig().aggregation == "clip" and GossipConfig().clip_radius is None
    assert GossipConfig().clip_iterations == 1
    for config in (ServerFreeConfig(), FedAvgConfig()):
        assert config.aggregation == "clip" and config.clip_radius is None
        assert (config.clip_scale, config.clip_iterations) == (1.0, 3)
    for config in (GossipConfig(), ServerFreeConfig(), FedAvgConfig()):
        assert config.clip_outlier == 4.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_gossip_clips_a_scaled_model_to_the_adaptive_radius(sign: float) -> None:
    ops = FloatOps(max_distance=1e12)
    machine, tick = trained_once(ops)
    # The own training step 1.0 -> 1.5 sets the scale: radius 2 x 0.5.
    assert machine.clip_radius() == 1.0
    machine.handle(MessageReceived("b", GossipModel(sign * 1e6, 1, 5)), tick - 1)
    # Own 1.5 (age 1) and b's model clipped to 1.5 +- 1.0 (age 1), equal weights.
    assert machine.handle(TimerFired(), tick) == [
        Adopt(1.5 + sign * 0.5),
        Train(1.5 + sign * 0.5, 2.0),
        SetTimer(tick + 10.0),
    ]
    assert ops.calls[-1] == ("clip", {"clip_radius": 1.0})
    # The far model entered the history capped at the radius: the radius did not grow.
    assert machine.clip_radius() == 1.0


def test_gossip_merges_peers_only_after_its_first_training_sets_the_scale() -> None:
    ops = FloatOps()
    machine = gossip(ops)
    machine.handle(MessageReceived("b", GossipModel(3.0, 1, 5)), 1.0)
    tick = machine.next_deadline()
    assert machine.handle(TimerFired(), tick)[:2] == [Adopt(1.0), Train(1.0, 2.0)]
    assert ops.calls == [("clip", {"clip_radius": 0.0})]


def test_an_explicit_radius_is_used_as_set() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, clip_radius=0.25)
    machine = gossip(ops, config)
    machine.handle(MessageReceived("b", GossipModel(1e6, 1, 5)), 1.0)
    machine.handle(TimerFired(), machine.next_deadline())
    # Own 1.0 weighs max(0, 1) = 1, b 1.25 weighs 1.
    assert machine.model == 1.125 and ops.calls == [("clip", {"clip_radius": 0.25})]


def test_an_age_inflated_model_cannot_push_the_own_model_out_of_a_clipped_merge() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, staleness_window=1, clip_scale=2.0)
    machine, tick = trained_once(ops, config)
    # Age 11 is within the default lead of 10 and makes the own age-1 model stale ...
    machine.handle(MessageReceived("b", GossipModel(-1e6, 11, 5)), tick - 1)
    machine.handle(TimerFired(), tick)
    # ... but the merge stays centred on it: the model moved by the radius, no more.
    assert machine.model == 0.5 and machine.dropped["stale_model"] == 1


def test_gossip_drops_a_model_far_beyond_what_peers_send_as_an_outlier() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, clip_scale=2.0, clip_outlier=4.0)
    machine, tick = trained_once(ops, config)
    # Distances from the own 1.5: 0.5, then 0.7 (limit 4 x median(0.5, 0.7) = 2.0), then
    # 10.0 (limit 4 x median(0.5, 0.7, 10) = 2.8): dropped on arrival, counted, a strike.
    for peer, value, age in [("b", 2.0, 2), ("c", 0.8, 3), ("c", 11.5, 4)]:
        assert machine.handle(MessageReceived(peer, GossipModel(value, age, 5)), tick - 5) == []
    assert machine.dropped["clip_outlier"] == 1 and dict(machine._strikes) == {"c": 1}
    # The inbox holds b's and c's first models; the merge clips each to the radius 1.0.
    assert [w for _, w, _ in machine._inbox] == [2.0, 0.8]
    machine.handle(TimerFired(), tick)
    assert machine.model == pytest.approx((1.5 * 1 + 2.0 * 2 + 0.8 * 3) / 6)


def test_a_peer_that_keeps_sending_outliers_is_penalized() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, clip_outlier=4.0)
    machine, tick = trained_once(ops, config)
    for age in (2, 3, 4, 5, 6):
        machine.handle(MessageReceived("b", GossipModel(2.0, age, 5)), tick - 5)
    actions = []
    for age in (2, 3, 4):  # c sends the negated model, 3.0 away against b's 0.5
        actions += machine.handle(MessageReceived("c", GossipModel(-1.5, age, 5)), tick - 4)
    assert actions == [Penalize("c", "clip_outlier")]
    assert machine.dropped["clip_outlier"] == 3 and machine.peers == {"b"}


def test_a_node_far_from_every_peer_still_merges_them() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, clip_scale=2.0, clip_outlier=2.0)
    machine, tick = trained_once(ops, config)
    # Every peer is 100 away: far from this node's own steps (0.5), but not from each other's
    # distances, so none is an outlier (the limit follows what peers send).
    for peer, age in [("b", 2), ("c", 3), ("b", 4)]:
        machine.handle(MessageReceived(peer, GossipModel(101.5, age, 5)), tick - 5)
    assert machine.dropped["clip_outlier"] == 0 and len(machine._inbox) == 2


def _trained_in_round_0(learner: Any, config: Any, ops: FloatOps, report: Any) -> Any:
    """A round-based machine at 1.0 with peers b, c, d, started, its own training done (2.0)."""
    machine = learner("a", 1.0, ops, random.Random(0), config)
    for peer in ("b", "c", "d"):
        machine.handle(PeerUp(peer), 0.0)
    machine.handle(Start(), 0.0)
    machine.handle(TrainingDone(2.0, report(10)), 1.0)
    return machine


def test_server_free_and_fedavg_count_an_outlier_as_arrived(report: Any) -> None:
    ops = FloatOps(max_distance=1e12)
    for learner, config in [
        (ServerFreeLearner, ServerFreeConfig(round_timeout=5.0, clip_outlier=3.0)),
        (FedAvgLearner, FedAvgConfig(round_timeout=5.0, clip_outlier=3.0)),
    ]:
        machine = _trained_in_round_0(learner, config, ops, report)  # step 1.0: radius 1.0
        machine.handle(MessageReceived("b", RU(0, 2.5, 10)), 2.0)
        machine.handle(MessageReceived("c", RU(0, 3.0, 10)), 2.0)
        # 1e6 from the centre 1.0, against a median received distance of 1.5 to 2.0: dropped,
        # and the round closes at once (no wait for d's timeout), on own, b and c only:
        # 1.0 -> 2.0 (+1 +1 +1) -> 2.5 (+0 +0.5 +1) -> 2.5 (-0.5 +0 +0.5).
        actions = machine.handle(MessageReceived("d", RU(0, 1e6, 10)), 2.0)
        assert machine.dropped["clip_outlier"] == 1
        assert actions[0] == Adopt(2.5)
        assert Metric("round_models_merged", 3) in actions


@pytest.mark.parametrize("rule", [*OUTLIER_RULES, "mean"])
def test_every_robust_rule_rejects_outliers_before_merging_and_plain_mean_none(
    report: Any, rule: str
) -> None:
    ops = FloatOps(max_distance=1e12)
    for learner, config in [
        (ServerFreeLearner, ServerFreeConfig(round_timeout=5.0, aggregation=rule)),
        (FedAvgLearner, FedAvgConfig(round_timeout=5.0, aggregation=rule)),
    ]:
        machine = _trained_in_round_0(learner, config, ops, report)
        machine.handle(MessageReceived("b", RU(0, 2.5, 10)), 2.0)
        machine.handle(MessageReceived("c", RU(0, 3.0, 10)), 2.0)
        # d's model is 1e6 away against received distances of 1.5 and 2.0 (default limit 4 x).
        actions = machine.handle(MessageReceived("d", RU(0, 1e6, 10)), 2.0)
        (adopted,) = [a for a in actions if isinstance(a, Adopt)]
        if rule == "mean":  # the unbounded reference: nothing rejected, d's model merged
            assert machine.dropped["clip_outlier"] == 0 and adopted.weights > 1e5
            assert Metric("round_models_merged", 4) in actions
        else:  # rejected on arrival, a strike; the rule merges own, b and c only
            assert machine.dropped["clip_outlier"] == 1 and dict(machine._strikes) == {"d": 1}
            assert 2.0 <= adopted.weights <= 3.0
            assert Metric("round_models_merged", 3) in actions


def test_plain_mean_only_when_configured() -> None:
    ops = FloatOps(max_distance=1e12)
    config = GossipConfig(period=10.0, jitter=0.0, budget=2.0, aggregation="mean")
    machine = gossip(ops, config)
    machine.handle(MessageReceived("b", GossipModel(1e6, 1, 5)), 1.0)
    machine.handle(TimerFired(), machine.next_deadline())
    assert machine.model == (1.0 + 1e6) / 2 and ops.calls == [("mean", {})]


def test_server_free_clips_every_model_around_the_rounds_starting_model(report: Any) -> None:
    ops = FloatOps(max_distance=1e12)
    # Clipping alone: the default would reject c's model as an outlier first (tested below).
    config = ServerFreeConfig(clip_outlier=math.inf)
    machine = _trained_in_round_0(ServerFreeLearner, config, ops, report)  # radius 1 x step 1.0
    machine.handle(MessageReceived("b", RU(0, 2.5, 10)), 2.0)
    machine.handle(MessageReceived("c", RU(0, -1e6, 10)), 2.0)
    actions = machine.handle(MessageReceived("d", RU(0, 3.0, 10)), 3.0)
    # Centred on 1.0 (the round's start), every difference clipped to 1.0, three steps:
    # 1.0 -> 1.5 (+1 +1 -1 +1) -> 1.875 (+0.5 +1 -1 +1) -> 2.0625 (+0.125 +0.625 -1 +1).
    assert actions[:3] == [
        Adopt(2.0625),
        Metric("round_completed", 0),
        Metric("round_models_merged", 4),
    ]
    assert ops.calls == [("clip", {"clip_radius": 1.0, "clip_iterations": 3})]


def test_fedavg_default_centred_clipping_bounds_a_sign_flipped_update(report: Any) -> None:
    ops = FloatOps(max_distance=1e12)
    config = FedAvgConfig(round_timeout=5.0, clip_outlier=math.inf)  # clipping alone
    machine = _trained_in_round_0(FedAvgLearner, config, ops, report)
    machine.handle(MessageReceived("b", RU(0, 2.5, 10)), 2.0)
    machine.handle(MessageReceived("c", RU(0, -1e6, 10)), 2.0)
    actions = machine.handle(MessageReceived("d", RU(0, 3.0, 10)), 2.0)
    # Around the global 1.0 with radius 1.0 (the aggregator's own step), as server-free above.
    assert actions[0] == Adopt(2.0625)
    assert ops.calls == [("clip", {"clip_radius": 1.0, "clip_iterations": 3})]
    assert Send("c", GlobalModel(1, 2.0625)) in actions


def test_fedavg_multikrum_leaves_a_scaled_update_out(report: Any) -> None:
    ops = FloatOps(max_distance=1e12)
    # Multi-Krum alone: the default would reject c's model as an outlier first (tested above).
    config = FedAvgConfig(round_timeout=5.0, aggregation="multikrum", clip_outlier=math.inf)
    machine = _trained_in_round_0(FedAvgLearner, config, ops, report)
    machine.handle(MessageReceived("b", RU(0, 2.5, 10)), 2.0)
    machine.handle(MessageReceived("c", RU(0, -1e6, 10)), 2.0)
    actions = machine.handle(MessageReceived("d", RU(0, 3.0, 10)), 2.0)
    assert actions[0] == Adopt(2.5) and ops.calls == [("multikrum", {})]
    assert Send("c", GlobalModel(1, 2.5)) in actions


def test_ops_without_distance_get_rule_names_only() -> None:
    ops = LegacyOps()
    machine, tick = trained_once(
        ops, GossipConfig(period=10.0, jitter=0.0, budget=2.0, max_age_lead=2)
    )
    machine.handle(MessageReceived("b", GossipModel(2.5, 1, 5)), tick - 1)
    machine.handle(TimerFired(), tick)
    assert ops.calls == ["clip"] and machine.clip_radius() is None


def test_a_diverged_training_result_is_replaced_by_the_model_trained_on(ops: Any) -> None:
    machine = gossip(ops)
    tick = machine.next_deadline()
    machine.handle(TimerFired(), tick)
    actions = machine.handle(TrainingDone(float("nan"), Report(5)), tick + 1)
    assert actions[0] == Adopt(1.0) and isinstance(actions[1], Send)
    assert actions[1].message == GossipModel(1.0, 1, 5)
    assert machine.dropped["own_training_invalid:not_finite"] == 1


def test_a_long_own_training_step_is_not_held_to_the_bound_for_peers(report: Any) -> None:
    machine = gossip(FloatOps(max_distance=1.0))
    tick = machine.next_deadline()
    machine.handle(TimerFired(), tick)
    assert machine.handle(TrainingDone(5.0, report(5)), tick + 1)[0] == Adopt(5.0)
    assert not machine.dropped


def test_rule_parameters_an_ops_without_params_would_ignore_are_refused() -> None:
    config = GossipConfig(aggregation="clip", clip_radius=0.5, trim_fraction=0.1)
    with pytest.raises(ValueError, match="clip_radius, trim_fraction set, but this driver"):
        GossipLearner("a", 1.0, LegacyOps(), random.Random(0), config)


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"clip_radius": -1.0}, "clip_radius"),
        ({"clip_scale": 0.0}, "clip_scale"),
        ({"clip_window": 0}, "clip_window"),
        ({"clip_iterations": 0}, "clip_iterations"),
        ({"clip_outlier": 0.5}, "clip_outlier"),
        ({"krum_f": -1}, "krum_f"),
        ({"krum_m": 0}, "krum_m"),
        ({"trim_fraction": 0.5}, "trim_fraction"),
        ({"max_age_lead": -1}, "max_age_lead"),
    ],
)
def test_rule_settings_out_of_range_are_refused(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GossipLearner("a", 1.0, FloatOps(), random.Random(0), GossipConfig(**setting))

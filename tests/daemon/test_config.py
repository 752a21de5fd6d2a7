"""Configuration: the example loads; every mistake names the file, the line and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.daemon.config import ConfigError, load_config, locate, parse_config
from p2pfl.ml.partition import PARTITIONERS

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "p2pfl" / "daemon" / "p2pfl.toml"  # daemon/p2pfl.toml links to it


def _parse(text: str, tmp_path: Path) -> object:
    path = tmp_path / "p2pfl.toml"
    path.write_text(text)
    return load_config(path)


def test_example_config_loads_with_every_table() -> None:
    config = load_config(EXAMPLE)
    assert config.node.name == "cloudlet-1"
    assert config.trust.mode == "federation"
    assert config.discovery.static_peers == ()
    assert config.protocol.params == {"period": 5.0}
    assert config.metrics.host == "127.0.0.1"
    assert config.checkpoints.keep == 3
    assert config.control_socket == Path("/run/p2pfl/control.sock")


def test_example_config_comments_every_key() -> None:
    lines = EXAMPLE.read_text().splitlines()
    for number, line in enumerate(lines):
        if "=" in line and not line.lstrip().startswith("#"):
            above = lines[number - 1].lstrip()
            assert above.startswith("#"), f"line {number + 1} ({line}) has no comment above it"


def test_empty_file_uses_defaults_except_required_trust_files(tmp_path: Path) -> None:
    config = _parse('[trust]\nmode = "open"\n', tmp_path)
    assert config.protocol.name == "gossip"  # type: ignore[attr-defined]
    assert config.executor.threads == 1  # type: ignore[attr-defined]


def test_unknown_key_is_named_with_its_line(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n\n[discovery]\nmdns = true\nstatic_peer = ["a:1"]\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert info.value.line == 6
    assert info.value.key == "discovery.static_peer"
    assert str(info.value).startswith(f"{tmp_path / 'p2pfl.toml'}:6: discovery.static_peer: ")
    assert "static_peers" in str(info.value)  # lists the keys that do exist


def test_unknown_table_is_named_with_its_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _parse('[trust]\nmode = "open"\n[metric]\nport = 1\n', tmp_path)
    assert (info.value.line, info.value.key) == (3, "metric")


def test_wrong_type_is_named_with_its_line_and_expected_type(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[executor]\ndevice = "cpu"\n  threads = "four"\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert (info.value.line, info.value.key) == (5, "executor.threads")
    assert "expected an integer, got string 'four'" in str(info.value)


def test_boolean_is_not_accepted_as_a_number(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"limits.pending_links: expected an integer, got bool"):
        _parse('[trust]\nmode = "open"\n[limits]\npending_links = true\n', tmp_path)


def test_max_peers_is_read_into_the_learning_setup(tmp_path: Path) -> None:
    config = _parse('[trust]\nmode = "open"\n[limits]\nmax_peers = 8\n', tmp_path)
    assert config.protocol.setup.max_peers == 8
    assert _parse('[trust]\nmode = "open"\n', tmp_path).protocol.setup.max_peers is None


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "limits.max_peers: must be >= 1; got 0"),
        ("2.5", "limits.max_peers: must be an integer; got 2.5"),
        ("true", "limits.max_peers: must be an integer; got True"),
    ],
)
def test_max_peers_must_be_a_positive_integer(tmp_path: Path, value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse(f'[trust]\nmode = "open"\n[limits]\nmax_peers = {value}\n', tmp_path)
    assert f":4: {problem}" in str(info.value)


def test_max_peers_is_refused_for_protocols_with_fixed_peers(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[protocol]\nname = "fedavg"\n[limits]\nmax_peers = 4\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert ":6: limits.max_peers: bounds gossip's links by peer sampling" in str(info.value)


def test_transfer_timeout_is_a_positive_number_of_seconds(tmp_path: Path) -> None:
    config = _parse('[trust]\nmode = "open"\n[limits]\ntransfer_timeout_s = 12.5\n', tmp_path)
    assert config.limits.transfer_timeout_s == 12.5
    with pytest.raises(ConfigError, match=r"limits.transfer_timeout_s: .*> 0"):
        _parse('[trust]\nmode = "open"\n[limits]\ntransfer_timeout_s = 0\n', tmp_path)


def test_wrong_choice_lists_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _parse('[protocol]\nname = "gosip"\n', tmp_path)
    assert info.value.line == 2
    assert '"gossip", "server-free", "fedavg"' in str(info.value)


def test_every_partition_a_scenario_names_is_a_daemon_partition(tmp_path: Path) -> None:
    # The processes engine writes a scenario's partition into each daemon's [task]: a
    # partition the daemon refused made a valid scenario fail there ("quantity" did).
    for partition in PARTITIONERS:
        text = f'[trust]\nmode = "open"\n[task]\npartition = "{partition}"\nalpha = 0.3\n'
        assert _parse(text, tmp_path).task.partition == partition  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match='"iid", "dirichlet", "quantity"'):
        _parse('[trust]\nmode = "open"\n[task]\npartition = "skewed"\n', tmp_path)


def test_a_graph_task_refuses_a_partition(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[task]\nname = "traffic-metr-la"\npartition = "dirichlet"\n'
    with pytest.raises(ConfigError, match=r":5: task\.partition: the nodes of traffic-metr-la"):
        _parse(text, tmp_path)


def test_a_listen_host_that_is_not_an_ip_address_is_named(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[discovery]\nlisten_host = "999.1.1.1"\n'
    with pytest.raises(ConfigError, match=r':4: discovery\.listen_host: "999.1.1.1" is not an IP'):
        _parse(text, tmp_path)
    config = _parse(text.replace("999.1.1.1", "::"), tmp_path)
    assert config.discovery.listen_host == "::"  # type: ignore[attr-defined]


def test_dotted_key_at_top_level_is_located(tmp_path: Path) -> None:
    text = 'trust.mode = "open"\n# comment\nexecutor.threads = 0\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert (info.value.line, info.value.key) == (3, "executor.threads")
    assert "an integer >= 1" in str(info.value)


def test_list_element_of_wrong_type_is_an_error(tmp_path: Path) -> None:
    text = 'trust.mode = "open"\n[discovery]\nstatic_peers = ["a:1", 2]\n'
    expected = r":3: discovery.static_peers: expected a list of strings"
    with pytest.raises(ConfigError, match=expected):
        _parse(text, tmp_path)


def test_static_peer_without_port_is_an_error(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[discovery]\nstatic_peers = ["10.0.0.1"]\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert info.value.line == 4
    assert "is not host:port" in str(info.value)


def test_federation_mode_without_key_file_says_what_to_add(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _parse('[trust]\nmode = "federation"\n', tmp_path)
    assert info.value.key == "trust.federation_public_key"
    assert info.value.line == 1  # the [trust] table, since the key itself is absent
    assert "`p2pfl federation init`" in str(info.value)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    config = _parse('[node]\nstate_dir = "state"\n[trust]\nmode = "open"\n', tmp_path)
    assert config.state_dir == tmp_path / "state"  # type: ignore[attr-defined]


def test_invalid_toml_reports_tomllib_position(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not valid TOML: .*line 2"):
        _parse("[trust]\nmode = \n", tmp_path)


def test_missing_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")


def test_late_errors_still_point_at_the_line(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[protocol.params]\nperiod = 5.0\nstaleness_window = 3\n'
    path = tmp_path / "p.toml"
    config = parse_config(text, path)
    error = config.error("protocol.params.staleness_window", "too small")
    assert (error.line, error.key) == (5, "protocol.params.staleness_window")


def test_locate_handles_quoted_keys_and_array_tables() -> None:
    text = '[a]\n"b" = 1\n[[c]]\nd = 2\n[e . f]\ng = 3\n'
    assert locate(text, ["a", "b"]) == 2
    assert locate(text, ["c", "d"]) == 4
    assert locate(text, ["c[0]", "d"]) == 4
    assert locate("[[s]]\nx = 1\n[[s]]\ny = 2\nx = 3\n", ["s[1]", "x"]) == 5
    assert locate(text, ["e", "f", "g"]) == 6
    assert locate(text, ["e", "f", "missing"]) == 5
    assert locate(text, ["nowhere"]) is None


def test_path_mtu_is_read_and_below_ipv6_minimum_is_refused(tmp_path: Path) -> None:
    (tmp_path / "p2pfl.toml").write_text('trust.mode = "open"\n[discovery]\npath_mtu = 1420\n')
    assert load_config(tmp_path / "p2pfl.toml").discovery.path_mtu == 1420
    with pytest.raises(ConfigError) as info:
        _parse('trust.mode = "open"\n[discovery]\npath_mtu = 576\n', tmp_path)
    assert (info.value.line, info.value.key) == (3, "discovery.path_mtu")
    assert ">= 1280" in str(info.value)


FEDERATION_KEY = 'federation_public_key = "' + "ab" * 32 + '"\n'


@pytest.mark.parametrize(
    ("trust", "key"),
    [
        ('mode = "open"\n' + FEDERATION_KEY, "federation_public_key"),
        ('mode = "allowlist"\nallowlist = "keys"\ncertificate = "node.cert"\n', "certificate"),
        ('mode = "federation"\n' + FEDERATION_KEY + 'allowlist = "keys"\n', "allowlist"),
    ],
)
def test_a_key_of_another_trust_mode_is_refused(tmp_path: Path, trust: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        _parse("[trust]\n" + trust, tmp_path)
    assert info.value.key == f"trust.{key}"
    assert "applies only to mode" in info.value.message


def test_revocations_need_federation_trust(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\nrevocations = "revoked.list"\n'
    with pytest.raises(ConfigError) as info:
        _parse(text, tmp_path)
    assert (info.value.key, info.value.line) == ("trust.revocations", 3)
    assert "federation" in str(info.value)


def test_unreadable_or_invalid_revocation_list_names_file_line_and_key(tmp_path: Path) -> None:
    from p2pfl.daemon.revocations import load_revocations
    from p2pfl.identity import NodeIdentity
    from p2pfl.trust import FederationAuthority, TrustPolicy

    authority = FederationAuthority.generate()
    text = (
        f'[node]\nstate_dir = "state"\n[trust]\nfederation_public_key = '
        f'"{authority.public_key.hex()}"\nrevocations = "revoked.list"\n'
    )
    path = tmp_path / "p2pfl.toml"
    path.write_text(text)
    config = load_config(path)
    policy = TrustPolicy.federation(authority.public_key)
    with pytest.raises(ConfigError, match=r"p2pfl.toml:5: trust.revocations: .*No such file"):
        load_revocations(config, policy)
    other = FederationAuthority.generate()
    (tmp_path / "revoked.list").write_bytes(
        other.revoke({NodeIdentity.generate().public_key: None}, serial=1)
    )
    with pytest.raises(ConfigError, match="foreign_revocations") as info:
        load_revocations(config, policy)
    assert info.value.line == 5
    # A valid list is adopted; the stored copy in the state directory, if newer, wins.
    revoked = NodeIdentity.generate().public_key
    (tmp_path / "revoked.list").write_bytes(authority.revoke({revoked: None}, serial=1))
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "revocations.list").write_bytes(authority.revoke({}, serial=2))
    load_revocations(config, policy)
    assert policy.revocations is not None and policy.revocations.serial == 2


RANGE = """[trust]
mode = "open"

[node]
position = [34.072, -118.3]

[protocol]
name = "server-free"
neighbours = "range"
range_km = 16.0

[protocol.positions]
aaaa = [34.155, -118.49]
bbbb = [34.15, -118.415]
"""


def test_range_neighbours_read_position_range_and_member_positions(tmp_path: Path) -> None:
    config = _parse(RANGE, tmp_path)
    assert config.node.position == (34.072, -118.3)  # type: ignore[attr-defined]
    assert config.protocol.positions == {  # type: ignore[attr-defined]
        "aaaa": (34.155, -118.49),
        "bbbb": (34.15, -118.415),
    }


@pytest.mark.parametrize(
    ("old", "new", "line", "key", "says"),
    [
        ("position = [34.072, -118.3]\n", "", 8, "protocol.neighbours", "[node] position"),
        ("range_km = 16.0\n", "", 9, "protocol.neighbours", "range_km"),
        (
            "aaaa = [34.155, -118.49]\nbbbb = [34.15, -118.415]\n",
            "",
            9,
            "protocol.neighbours",
            "[protocol.positions]",
        ),
        ("[34.072, -118.3]", "[134.0, -118.3]", 5, "node.position", "latitude is -90..90"),
        ("[34.155, -118.49]", "[34.155]", 13, "protocol.positions.aaaa", "[latitude, longitude]"),
        ('"server-free"', '"gossip"', 9, "protocol.neighbours", "only server-free"),
        ("range_km = 16.0", "range_km = 0", 10, "protocol.range_km", "must be > 0"),
        ('neighbours = "range"', 'neighbours = "task"', 9, "protocol.neighbours", '"range"'),
        # Positions with another kind of neighbours would be read and do nothing.
        (
            'neighbours = "range"\nrange_km = 16.0\n',
            "",
            10,
            "protocol.positions",
            'applies only with neighbours = "range"',
        ),
    ],
)
def test_range_neighbours_mistakes_name_file_line_and_key(
    tmp_path: Path, old: str, new: str, line: int, key: str, says: str
) -> None:
    assert old in RANGE
    with pytest.raises(ConfigError) as info:
        _parse(RANGE.replace(old, new), tmp_path)
    assert (info.value.line, info.value.key) == (line, key)
    assert str(info.value).startswith(f"{tmp_path / 'p2pfl.toml'}:{line}: {key}: ")
    assert says in str(info.value)


def test_topology_neighbours_need_the_neighbour_ids(tmp_path: Path) -> None:
    text = '[trust]\nmode = "open"\n[protocol]\nname = "server-free"\nneighbours = "topology"\n'
    with pytest.raises(ConfigError, match=r":5: protocol\.neighbours: .*neighbour_ids"):
        _parse(text, tmp_path)
    ids = 'neighbour_ids = ["aaaa"]\n'
    with pytest.raises(
        ConfigError, match=r':5: protocol\.neighbour_ids: .*neighbours = "topology"'
    ):
        _parse('[trust]\nmode = "open"\n[protocol]\nname = "server-free"\n' + ids, tmp_path)
    config = _parse(text + 'neighbour_ids = ["aaaa"]\n', tmp_path)
    assert config.protocol.neighbour_ids == ("aaaa",)  # type: ignore[attr-defined]


def test_a_setup_key_in_the_wrong_table_says_where_it_goes(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _parse('[trust]\nmode = "open"\n[protocol]\nperiod = 2.0\n', tmp_path)
    assert str(info.value).endswith(
        ":4: protocol.period: a parameter of the protocol or its rule: write it under "
        "[protocol.params]"
    )
    with pytest.raises(ConfigError) as info:
        _parse('[trust]\nmode = "open"\n[protocol.params]\nmax_norm = 2.0\n', tmp_path)
    assert "protocol.params.max_norm: not a protocol parameter; write it as [protocol]" in str(
        info.value
    )


def test_the_setup_keys_reach_the_learner(tmp_path: Path) -> None:
    text = (
        '[trust]\nmode = "open"\n[task]\nepochs = 0.25\n[protocol]\nname = "fedavg"\n'
        'aggregation = "krum"\nmax_norm = 3.0\n[protocol.params]\nkrum_f = 1\nround_timeout = 4.0\n'
    )
    setup = _parse(text, tmp_path).protocol.setup
    assert (setup.protocol, setup.aggregation, setup.epochs, setup.max_norm) == (
        "fedavg",
        "krum",
        0.25,
        3.0,
    )
    assert setup.params() == {"krum_f": 1, "round_timeout": 4.0}


def test_the_training_keys_are_task_keys_of_the_setup(tmp_path: Path) -> None:
    """[task] lr_schedule, lr_final, keep_optimizer: the setup's keys, by its validator."""
    head = '[trust]\nmode = "open"\n[protocol]\nname = "fedavg"\n'
    rounds = "[protocol.params]\nmax_rounds = 8\n"
    text = head + rounds + '[task]\nlr_schedule = "cosine"\nlr_final = 0.2\nkeep_optimizer = true\n'
    setup = _parse(text, tmp_path).protocol.setup  # type: ignore[attr-defined]
    assert (setup.lr_schedule, setup.lr_final, setup.keep_optimizer) == ("cosine", 0.2, True)
    assert setup.lr_scale(0) < 1.0 and setup.lr_scale(7) == pytest.approx(0.2, abs=0.02)
    plain = _parse(head, tmp_path).protocol.setup  # type: ignore[attr-defined]
    assert (plain.lr_schedule, plain.keep_optimizer, plain.lr_scale(3)) == ("constant", False, 1.0)
    cases = [
        # (text, the line and key, the problem)
        (head + '[task]\nlr_schedule = "cosine"\n', ":6: task.lr_schedule: a schedule runs over"),
        (head + rounds + "[task]\nlr_final = 0.2\n", ":8: task.lr_final: applies only with lr_sc"),
        (head + rounds + '[task]\nlr_schedule = "linear"\n', ":8: task.lr_schedule: must be one"),
        (head + rounds + "[task]\nkeep_optimizer = 1\n", ":8: task.keep_optimizer: must be true"),
    ]
    for text, expected in cases:
        with pytest.raises(ConfigError) as info:
            _parse(text, tmp_path)
        assert expected in str(info.value), str(info.value)

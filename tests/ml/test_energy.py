"""Energy comes from RAPL counters when readable, else None; never an estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pfl.ml.energy import EnergyMeter


def _zone(root: Path, name: str, energy_uj: int, max_uj: int = 1_000_000_000) -> Path:
    zone = root / name
    zone.mkdir()
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return zone


def test_rapl_packages_are_summed_and_subzones_not_double_counted(tmp_path: Path) -> None:
    p0 = _zone(tmp_path, "intel-rapl:0", 5_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", 1_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", 0)
    meter = EnergyMeter("cpu", powercap=tmp_path)
    assert meter.available
    meter.start()
    (p0 / "energy_uj").write_text("7500000\n")
    (p1 / "energy_uj").write_text("2000000\n")
    (core / "energy_uj").write_text("9000000\n")
    assert meter.stop() == pytest.approx(3.5)


def test_a_wrapped_counter_adds_the_counter_range(tmp_path: Path) -> None:
    zone = _zone(tmp_path, "intel-rapl:0", 999_000_000, max_uj=1_000_000_000)
    meter = EnergyMeter("cpu", powercap=tmp_path)
    meter.start()
    (zone / "energy_uj").write_text("2000000\n")
    assert meter.stop() == pytest.approx(3.0)


def test_no_counter_means_none(tmp_path: Path) -> None:
    meter = EnergyMeter("cpu", powercap=tmp_path / "absent")
    meter.start()
    assert not meter.available and meter.stop() is None

"""Energy of a job, measured where the machine exposes a counter, else None (never an estimate).

- CPU: RAPL package counters under ``/sys/class/powercap/intel-rapl:N/energy_uj`` (Intel, and
  AMD on recent kernels through the same interface); wrap-around handled with
  ``max_energy_range_uj``. Needs read permission (often root only since 2020).
- GPU: NVML's total energy counter (Volta and later) when ``pynvml`` is installed.

The figure covers the whole package/GPU, not just this process: on a shared machine it is an
upper bound of the job's energy.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["EnergyMeter"]

_POWERCAP = Path("/sys/class/powercap")


def _rapl_packages(root: Path = _POWERCAP) -> list[Path]:
    """Top-level RAPL zones (``intel-rapl:0``), not their subzones, which they already include."""
    zones = []
    for zone in sorted(root.glob("intel-rapl:*")):
        if zone.name.count(":") == 1 and (zone / "energy_uj").exists():
            try:
                int((zone / "energy_uj").read_text())
            except (OSError, ValueError):
                continue
            zones.append(zone)
    return zones


class EnergyMeter:
    """``start()`` then ``stop() -> joules | None``; None when no counter can be read."""

    def __init__(self, device: str = "cpu", *, powercap: Path = _POWERCAP) -> None:
        self._device = device
        self._zones = _rapl_packages(powercap) if not device.startswith("cuda") else []
        self._nvml_handle: object | None = None
        if device.startswith("cuda"):
            self._nvml_handle = self._open_nvml(device)
        self._start: list[int] | None = None

    @staticmethod
    def _open_nvml(device: str) -> object | None:
        try:
            import pynvml  # optional: not a dependency
        except ImportError:
            return None
        try:
            pynvml.nvmlInit()
            index = int(device.split(":")[1]) if ":" in device else 0
            handle: object = pynvml.nvmlDeviceGetHandleByIndex(index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
            return handle
        except Exception:  # NVML missing or counter unsupported: report None, not a guess
            return None

    @property
    def available(self) -> bool:
        return bool(self._zones) or self._nvml_handle is not None

    def _read(self) -> list[int] | None:
        try:
            if self._nvml_handle is not None:
                import pynvml

                # millijoules -> microjoules, to share the RAPL arithmetic
                return [int(pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml_handle)) * 1000]
            if self._zones:
                return [int((z / "energy_uj").read_text()) for z in self._zones]
        except (OSError, ValueError):
            return None
        except Exception:
            return None
        return None

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float | None:
        end = self._read()
        if self._start is None or end is None or len(end) != len(self._start):
            return None
        total_uj = 0
        for i, (a, b) in enumerate(zip(self._start, end, strict=True)):
            delta = b - a
            if delta < 0 and self._zones:  # the counter wrapped
                try:
                    delta += int((self._zones[i] / "max_energy_range_uj").read_text())
                except (OSError, ValueError):
                    return None
            total_uj += delta
        return total_uj / 1e6

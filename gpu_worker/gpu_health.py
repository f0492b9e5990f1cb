"""GPU health from NVML: critical XID errors, uncorrectable ECC errors, a lost device, exhausted
memory.  The worker's lease keeper calls :meth:`GpuHealth.check` on every heartbeat; a reason
string means the GPU is unhealthy and the worker leaves rotation.  Without NVML or a GPU the
checks are skipped, with one log line saying so.

``python -m gpu_worker.gpu_health [index]`` runs one probe and prints what it read, as JSON.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

log = logging.getLogger("mgpu.gpu")

# XIDs that mean the GPU (not the application) is in trouble: ECC/page retirement, fallen off the
# bus, NVLink, GSP and contained/uncontained memory errors.  Application faults (13, 31, 43, 45)
# are not here: they kill a request, not the GPU.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 69, 74, 79, 92, 94, 95, 109, 119, 120, 136, 140, 143, 154})


@dataclass
class GpuReading:
    index: int
    name: str = ""
    uuid: str = ""
    memory_used_bytes: int = 0
    memory_total_bytes: int = 0
    utilization_pct: float | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_uncorrected: int | None = None
    xids: list[int] = field(default_factory=list)
    problem: str | None = None


class GpuHealth:
    """Reads one GPU through an NVML module (``pynvml`` by default; tests pass a fake)."""

    def __init__(self, index: int | None, nvml: Any = None, *, min_free_bytes: int = 64 << 20) -> None:
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.available = False
        self._nvml = nvml
        self._handle: Any = None
        self._events: Any = None
        self._ecc_baseline: int | None = None
        self.name = ""
        if index is None:
            log.info("no GPU assigned: GPU health checks skipped")
            return
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            name = self._nvml.nvmlDeviceGetName(self._handle)
            self.name = name.decode() if isinstance(name, bytes) else str(name)
            self.available = True
        except Exception as exc:  # no library, no driver, no such device
            log.info("NVML unavailable (%s): GPU health checks skipped", exc)
            return
        try:
            self._events = self._nvml.nvmlEventSetCreate()
            self._nvml.nvmlDeviceRegisterEvents(self._handle, self._nvml.nvmlEventTypeXidCriticalError, self._events)
        except Exception as exc:
            log.info("NVML XID events unsupported here (%s)", exc)
            self._events = None
        self._ecc_baseline = self._ecc()

    def _ecc(self) -> int | None:
        try:
            return int(self._nvml.nvmlDeviceGetTotalEccErrors(
                self._handle, self._nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, self._nvml.NVML_VOLATILE_ECC))
        except Exception:
            return None  # ECC off or unsupported

    def _xids(self) -> list[int]:
        out: list[int] = []
        if self._events is None:
            return out
        for _ in range(64):
            try:
                data = self._nvml.nvmlEventSetWait(self._events, 0)
            except Exception:  # NVMLError_Timeout: no event pending
                break
            out.append(int(data.eventData))
        return out

    def read(self) -> GpuReading:
        r = GpuReading(index=-1 if self.index is None else self.index, name=self.name)
        if not self.available:
            return r
        n = self._nvml
        try:
            mem = n.nvmlDeviceGetMemoryInfo(self._handle)
            r.memory_used_bytes, r.memory_total_bytes = int(mem.used), int(mem.total)
        except n.NVMLError_GpuIsLost:
            r.problem = "GPU is lost (fell off the bus)"
            return r
        except Exception as exc:
            r.problem = f"NVML memory query failed: {exc}"
            return r
        for attr, fn in (("utilization_pct", lambda: n.nvmlDeviceGetUtilizationRates(self._handle).gpu),
                         ("temperature_c", lambda: n.nvmlDeviceGetTemperature(self._handle, n.NVML_TEMPERATURE_GPU)),
                         ("power_w", lambda: n.nvmlDeviceGetPowerUsage(self._handle) / 1000.0),
                         ("uuid", lambda: n.nvmlDeviceGetUUID(self._handle))):
            try:
                v = fn()
                setattr(r, attr, v.decode() if isinstance(v, bytes) else v)
            except Exception:
                pass
        r.ecc_uncorrected = self._ecc()
        r.xids = self._xids()
        critical = [x for x in r.xids if x in CRITICAL_XIDS]
        if critical:
            r.problem = f"critical XID error(s) {critical}"
        elif r.ecc_uncorrected is not None and self._ecc_baseline is not None \
                and r.ecc_uncorrected > self._ecc_baseline:
            r.problem = f"{r.ecc_uncorrected - self._ecc_baseline} new uncorrectable ECC error(s)"
        elif r.memory_total_bytes and r.memory_total_bytes - r.memory_used_bytes < self.min_free_bytes:
            r.problem = "GPU memory exhausted"
        return r

    def check(self) -> str | None:
        """None when healthy (or unchecked); otherwise why the GPU must leave rotation."""
        if not self.available:
            return None
        return self.read().problem


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level="INFO")
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
        driver = pynvml.nvmlSystemGetDriverVersion()
    except Exception as exc:
        print(json.dumps({"nvml": False, "error": str(exc)}))
        return 1
    indices = [int(a) for a in args] or list(range(count))
    readings = [asdict(GpuHealth(i).read()) for i in indices]
    print(json.dumps({"nvml": True, "driver": driver if isinstance(driver, str) else driver.decode(),
                      "count": count, "gpus": readings}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

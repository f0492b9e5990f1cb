"""GPU readings from NVML (``pynvml``, from nvidia-ml-py), for the worker's ``/metrics``.

:func:`read_gpu` returns a plain :class:`GpuReading`; every field NVML cannot give on this GPU
(ECC on consumer cards, power on some boards) is ``None`` and is left out of the metrics.  The
``nvml`` argument is the ``pynvml`` module or any object with the same functions (tests pass a
fake).  XID errors are events, not counters: :class:`GpuSampler` counts them in a thread.

Where there is no GPU or no NVML, :class:`GpuSampler` logs one line and reads nothing.

Probe (prints every GPU's readings as JSON)::

    python -m gpu_worker.gpu_metrics
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger("mgpu.gpu")

T = TypeVar("T")


@dataclass
class GpuReading:
    index: int
    name: str | None = None
    uuid: str | None = None
    utilization_ratio: float | None = None  # 0..1, the share of time a kernel ran
    memory_utilization_ratio: float | None = None  # 0..1, the share of time memory was read or written
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_celsius: float | None = None
    power_watts: float | None = None
    power_limit_watts: float | None = None
    ecc_corrected_total: int | None = None  # volatile: since the driver loaded
    ecc_uncorrected_total: int | None = None
    xid_errors_total: int = 0  # XID critical-error events seen by this process
    last_xid: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _try(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported and friends: this GPU cannot say
        return None


def read_gpu(nvml: Any, index: int) -> GpuReading:
    """One reading of GPU ``index`` (NVML's index: physical, ignores CUDA_VISIBLE_DEVICES)."""
    h = nvml.nvmlDeviceGetHandleByIndex(index)
    r = GpuReading(index=index)
    r.name = _try(lambda: _text(nvml.nvmlDeviceGetName(h)))
    r.uuid = _try(lambda: _text(nvml.nvmlDeviceGetUUID(h)))
    util = _try(lambda: nvml.nvmlDeviceGetUtilizationRates(h))
    if util is not None:
        r.utilization_ratio = float(util.gpu) / 100.0
        r.memory_utilization_ratio = float(util.memory) / 100.0
    mem = _try(lambda: nvml.nvmlDeviceGetMemoryInfo(h))
    if mem is not None:
        r.memory_used_bytes, r.memory_total_bytes = int(mem.used), int(mem.total)
    temp = _try(lambda: nvml.nvmlDeviceGetTemperature(h, nvml.NVML_TEMPERATURE_GPU))
    r.temperature_celsius = None if temp is None else float(temp)
    power = _try(lambda: nvml.nvmlDeviceGetPowerUsage(h))  # milliwatts
    r.power_watts = None if power is None else power / 1000.0
    limit = _try(lambda: nvml.nvmlDeviceGetEnforcedPowerLimit(h))
    r.power_limit_watts = None if limit is None else limit / 1000.0

    def ecc(kind: int) -> int | None:
        n = _try(lambda: nvml.nvmlDeviceGetTotalEccErrors(h, kind, nvml.NVML_VOLATILE_ECC))
        return None if n is None else int(n)

    r.ecc_corrected_total = ecc(nvml.NVML_MEMORY_ERROR_TYPE_CORRECTED)
    r.ecc_uncorrected_total = ecc(nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED)
    return r


class GpuSampler:
    """Reads one GPU for the worker's metrics; ``available`` is False without a GPU or NVML."""

    def __init__(self, index: int, nvml: Any | None = None, *, watch_xid: bool = True) -> None:
        self.index = index
        self.nvml = nvml
        self.available = False
        self.xid_errors = 0
        self.last_xid: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            if self.nvml is None:
                import pynvml

                self.nvml = pynvml
            self.nvml.nvmlInit()
            self.nvml.nvmlDeviceGetHandleByIndex(index)
            self.available = True
        except Exception as exc:
            log.info("no GPU metrics for gpu %s: NVML unavailable (%s)", index, exc)
            return
        if watch_xid:
            self._thread = threading.Thread(target=self._watch_xid, name="mgpu-xid-watch", daemon=True)
            self._thread.start()

    def read(self) -> GpuReading | None:
        if not self.available:
            return None
        try:
            r = read_gpu(self.nvml, self.index)
        except Exception as exc:  # the GPU fell off the bus, the driver went away: report nothing
            log.warning("reading gpu %s failed: %s", self.index, exc)
            return None
        r.xid_errors_total, r.last_xid = self.xid_errors, self.last_xid
        return r

    def _watch_xid(self) -> None:
        nvml = self.nvml
        assert nvml is not None
        try:
            es = nvml.nvmlEventSetCreate()
            nvml.nvmlDeviceRegisterEvents(nvml.nvmlDeviceGetHandleByIndex(self.index),
                                          nvml.nvmlEventTypeXidCriticalError, es)
        except Exception as exc:
            log.info("XID events not available on gpu %s: %s", self.index, exc)
            return
        try:
            while not self._stop.is_set():
                try:
                    data = nvml.nvmlEventSetWait_v2(es, 500)
                except nvml.NVMLError as exc:
                    if getattr(exc, "value", None) == nvml.NVML_ERROR_TIMEOUT:
                        continue
                    log.warning("XID event wait failed on gpu %s: %s", self.index, exc)
                    self._stop.wait(5.0)
                    continue
                self.xid_errors += 1
                self.last_xid = int(getattr(data, "eventData", 0))
                log.error("GPU XID error %s on gpu %s", self.last_xid, self.index)
        finally:
            try:
                nvml.nvmlEventSetFree(es)
            except Exception:
                pass

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2.0)
        if self.available:
            try:
                self.nvml.nvmlShutdown()  # type: ignore[union-attr]
            except Exception:
                pass
            self.available = False


def probe(nvml: Any | None = None) -> dict[str, Any]:
    """Every GPU's reading, or why there is none."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
    except Exception as exc:
        return {"gpus": [], "error": f"NVML unavailable: {exc}"}
    try:
        driver = _try(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        n = nvml.nvmlDeviceGetCount()
        return {"driver": driver, "gpus": [read_gpu(nvml, i).as_dict() for i in range(n)]}
    finally:
        nvml.nvmlShutdown()


def main() -> int:
    out = probe()
    print(json.dumps(out, indent=2))
    return 0 if out.get("gpus") else 1


if __name__ == "__main__":
    sys.exit(main())

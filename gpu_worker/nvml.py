"""The worker's one view of its GPU through NVML (``pynvml``, from nvidia-ml-py), for both its
health check and its metrics.

A :class:`Gpu` opens NVML once, keeps the device handle, and subscribes once to the GPU's XID
critical-error events.  Two threads use it:

* the liveness thread calls :meth:`Gpu.check` on every heartbeat: None when healthy (or not
  checked), else why the GPU must leave rotation: critical XIDs since the last check, new
  uncorrectable ECC errors (against the count at start), a lost device, exhausted memory;
* the metrics server calls :meth:`Gpu.read` at scrape time (the ``mgpu_gpu_*`` gauges and the
  XID counter): every field NVML cannot give on this GPU (ECC on consumer cards, power on some
  boards) is None and is left out of the metrics.

XID events are read without blocking by whichever call comes first; each is counted once
(``xid_errors_total``) and kept for the next check, so a scrape never hides one from the health
check.  Without a GPU index, NVML or the device, one line is logged, ``available`` is False,
:meth:`Gpu.check` answers None and :meth:`Gpu.read` None.  The ``nvml`` argument is the
``pynvml`` module or any object with the same functions (tests pass a fake).

Probe (every GPU's reading and health as JSON; exit code 1 when there is none)::

    python -m gpu_worker.nvml [index ...]
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

# XIDs that mean the GPU (not the application) is in trouble: ECC/page retirement, fallen off the
# bus, NVLink, GSP and contained/uncontained memory errors.  Application faults (13, 31, 43, 45)
# are not here: they kill a request, not the GPU.
CRITICAL_XIDS = frozenset({48, 61, 62, 63, 64, 69, 74, 79, 92, 94, 95, 109, 119, 120, 136, 140, 143, 154})
_XID_BATCH = 64  # events read at most per call


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
    problem: str | None = None  # why the GPU must leave rotation, as of this reading

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _try(fn: Callable[[], T]) -> T | None:
    try:
        return fn()
    except Exception:  # NVMLError_NotSupported and friends: this GPU cannot say (or do) it
        return None


class Gpu:
    """One GPU (NVML's index: physical, ignores CUDA_VISIBLE_DEVICES); thread-safe."""

    def __init__(self, index: int | None, nvml: Any = None, *, min_free_bytes: int = 64 << 20) -> None:
        self.index = index
        self.min_free_bytes = min_free_bytes
        self.available = False
        self.name = ""
        self.xid_errors_total = 0
        self.last_xid: int | None = None
        self._nvml = nvml
        self._handle: Any = None
        self._events: Any = None
        self._unchecked: list[int] = []  # XIDs seen since the last check
        self._ecc_baseline: int | None = None
        self._lock = threading.Lock()
        if index is None:
            log.info("no GPU assigned (--gpu): GPU health checks and GPU metrics skipped")
            return
        try:
            if self._nvml is None:
                import pynvml

                self._nvml = pynvml
            self._nvml.nvmlInit()
            self._handle = self._nvml.nvmlDeviceGetHandleByIndex(index)
            self.name = _text(self._nvml.nvmlDeviceGetName(self._handle))
        except Exception as exc:  # no library, no driver, no such device
            log.info("NVML unavailable for gpu %s (%s): GPU health checks and GPU metrics skipped", index, exc)
            return
        self.available = True
        self._events = self._subscribe()
        self._ecc_baseline = self._uncorrected_ecc()

    def _subscribe(self) -> Any:
        n = self._nvml
        try:
            events = n.nvmlEventSetCreate()
            n.nvmlDeviceRegisterEvents(self._handle, n.nvmlEventTypeXidCriticalError, events)
        except Exception as exc:
            log.info("NVML XID events unsupported on gpu %s (%s)", self.index, exc)
            return None
        return events

    # ------------------------------------------------------------------ the two readers
    def read(self) -> GpuReading | None:
        """Everything NVML says about the GPU now (None without one)."""
        if not self.available:
            return None
        with self._lock:
            return self._read()

    def check(self) -> str | None:
        """None when healthy (or unchecked); otherwise why the GPU must leave rotation."""
        if not self.available:
            return None
        with self._lock:
            problem = self._read().problem
            self._unchecked.clear()
            return problem

    def close(self) -> None:
        """Unsubscribe and shut NVML down (idempotent)."""
        with self._lock:
            if not self.available:
                return
            self.available = False
            n, events = self._nvml, self._events
            if events is not None:
                _try(lambda: n.nvmlEventSetFree(events))
            _try(n.nvmlShutdown)

    # ------------------------------------------------------------------ under the lock
    def _read(self) -> GpuReading:
        self._poll_xids()
        r = self._read_device()
        r.xid_errors_total, r.last_xid = self.xid_errors_total, self.last_xid
        r.problem = r.problem or self._problem(r)
        return r

    def _poll_xids(self) -> None:
        if self._events is None:
            return
        for _ in range(_XID_BATCH):
            try:
                data = self._nvml.nvmlEventSetWait_v2(self._events, 0)
            except Exception as exc:  # NVMLError_Timeout: no event pending; else the next call tries again
                if getattr(exc, "value", None) != getattr(self._nvml, "NVML_ERROR_TIMEOUT", None):
                    log.debug("XID event read failed on gpu %s: %s", self.index, exc)
                return
            xid = int(getattr(data, "eventData", 0))
            self.xid_errors_total += 1
            self.last_xid = xid
            self._unchecked.append(xid)
            log.error("GPU XID error %s on gpu %s", xid, self.index)

    def _read_device(self) -> GpuReading:
        n, h = self._nvml, self._handle
        r = GpuReading(index=-1 if self.index is None else self.index, name=self.name)
        try:
            mem = n.nvmlDeviceGetMemoryInfo(h)
            r.memory_used_bytes, r.memory_total_bytes = int(mem.used), int(mem.total)
        except n.NVMLError_GpuIsLost:
            r.problem = "GPU is lost (fell off the bus)"
        except Exception as exc:
            r.problem = f"NVML memory query failed: {exc}"
        r.uuid = _try(lambda: _text(n.nvmlDeviceGetUUID(h)))
        util = _try(lambda: n.nvmlDeviceGetUtilizationRates(h))
        if util is not None:
            r.utilization_ratio = _try(lambda: float(util.gpu) / 100.0)
            r.memory_utilization_ratio = _try(lambda: float(util.memory) / 100.0)
        r.temperature_celsius = _try(lambda: float(n.nvmlDeviceGetTemperature(h, n.NVML_TEMPERATURE_GPU)))
        r.power_watts = _try(lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)  # milliwatts
        r.power_limit_watts = _try(lambda: n.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0)
        r.ecc_corrected_total = _try(lambda: int(n.nvmlDeviceGetTotalEccErrors(
            h, n.NVML_MEMORY_ERROR_TYPE_CORRECTED, n.NVML_VOLATILE_ECC)))
        r.ecc_uncorrected_total = self._uncorrected_ecc()
        return r

    def _uncorrected_ecc(self) -> int | None:
        n = self._nvml
        return _try(lambda: int(n.nvmlDeviceGetTotalEccErrors(
            self._handle, n.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, n.NVML_VOLATILE_ECC)))

    def _problem(self, r: GpuReading) -> str | None:
        critical = [x for x in self._unchecked if x in CRITICAL_XIDS]
        if critical:
            return f"critical XID error(s) {critical}"
        ecc, baseline = r.ecc_uncorrected_total, self._ecc_baseline
        if ecc is not None and baseline is not None and ecc > baseline:
            return f"{ecc - baseline} new uncorrectable ECC error(s)"
        if r.memory_total_bytes and r.memory_used_bytes is not None \
                and r.memory_total_bytes - r.memory_used_bytes < self.min_free_bytes:
            return "GPU memory exhausted"
        return None


# ----------------------------------------------------------------------------- probe


def probe(nvml: Any = None, indices: list[int] | None = None) -> dict[str, Any]:
    """Every GPU's reading and health (or those of ``indices``), or why there is none."""
    try:
        if nvml is None:
            import pynvml

            nvml = pynvml
        nvml.nvmlInit()
    except Exception as exc:
        return {"nvml": False, "gpus": [], "error": f"NVML unavailable: {exc}"}
    try:
        driver = _try(lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        count = int(nvml.nvmlDeviceGetCount())
        gpus: list[dict[str, Any]] = []
        for i in indices or range(count):
            gpu = Gpu(i, nvml)
            try:
                reading = gpu.read()
                gpus.append(reading.as_dict() if reading is not None else {"index": i, "error": "unavailable"})
            finally:
                gpu.close()
        return {"nvml": True, "driver": driver, "count": count, "gpus": gpus}
    finally:
        nvml.nvmlShutdown()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level="INFO")
    out = probe(indices=[int(a) for a in args] or None)
    print(json.dumps(out, indent=2))
    return 0 if any("error" not in g for g in out["gpus"]) else 1


if __name__ == "__main__":
    sys.exit(main())

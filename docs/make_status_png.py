"""Renders real ``mgpu status --once`` output under load to docs/mgpu-status.png.

Starts a redis-server, four sim workers (three on one model, one slower; one on another) and a gateway, drives load from
threads, captures ``mgpu status --once --color`` and draws its ANSI text with matplotlib.

    .venv/bin/python docs/make_status_png.py
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ops.procs import RedisServer, mgpu_cmd, wait_until  # noqa: E402
from tests.conftest import Stack  # noqa: E402

ANSI = re.compile(r"\x1b\[([0-9;]*)m")
COLOURS = {"31": "#ff6b6b", "32": "#69db7c", "33": "#ffd43b"}


def capture() -> str:
    tmp = Path(tempfile.mkdtemp(prefix="mgpu-status-"))
    srv = RedisServer(tmp / "redis").start()
    s = Stack(tmp, srv, ns="mgpu")
    stop = threading.Event()
    try:
        # simulated workers, named as such: these are not GPU figures
        for g, decode in ((0, 40), (1, 40), (2, 80)):
            s.start_worker(model="sim-large", slots=4, sim_decode_ms=decode, worker_id=f"sim-w{g}",
                           log_level="WARNING")
        s.start_worker(model="sim-small", slots=8, sim_decode_ms=15, worker_id="sim-w3", log_level="WARNING")
        s.start_gateway(log_level="WARNING")
        s.r.xadd(s.keys.stream("sim-small"), {"p": "not json"})  # a malformed producer entry: dead-lettered

        def client(model: str, i: int) -> None:  # a closed-loop client
            with httpx.Client(timeout=60) as c:
                while not stop.is_set():
                    c.post(s.base_url + "/v1/completions", json={"model": model, "prompt": f"hello {i}",
                                                                 "max_tokens": 32})

        threads = [threading.Thread(target=client, args=("sim-large", i)) for i in range(20)]
        threads += [threading.Thread(target=client, args=("sim-small", i)) for i in range(10)]
        for t in threads:
            t.start()
        wait_until(lambda: int(s.r.hget(s.keys.worker("sim-w2"), "served") or 0) > 8, 60, "warm-up")
        out = subprocess.run(mgpu_cmd("status", "--once", "--color", "--interval", "2"), capture_output=True,
                             text=True, cwd=ROOT, env={**s._env({}), "PATH": "/usr/bin:/bin"}, check=True)
        return out.stdout
    finally:
        stop.set()
        s.stop_all()
        srv.stop()


def render(text: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = text.rstrip("\n").splitlines()
    width = max(len(ANSI.sub("", ln)) for ln in lines)
    cw, lh = 0.0835, 0.21  # inches per character cell / line at 10 pt
    fig = plt.figure(figsize=((width + 2) * cw, (len(lines) + 1) * lh), dpi=130)
    fig.patch.set_facecolor("#1e1e1e")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_axis_off()
    ax.set_xlim(0, width + 2)
    ax.set_ylim(len(lines) + 1, 0)
    for y, ln in enumerate(lines, start=1):
        x, colour, bold = 1, "#d4d4d4", False
        pos = 0
        for m in [*ANSI.finditer(ln), None]:
            end = m.start() if m else len(ln)
            chunk = ln[pos:end]
            for ch in chunk:  # one cell per character: exact columns whatever the font's advance
                if ch != " ":
                    ax.text(x, y, ch, family="DejaVu Sans Mono", fontsize=10, color=colour,
                            weight="bold" if bold else "normal", va="center", ha="left")
                x += 1
            if m is None:
                break
            codes = m.group(1)
            if codes in ("0", ""):
                colour, bold = "#d4d4d4", False
            elif codes == "1":
                bold = True
            elif codes in COLOURS:
                colour = COLOURS[codes]
            pos = m.end()
    fig.savefig(path, facecolor=fig.get_facecolor())
    plt.close(fig)


def main() -> int:
    text = capture()
    (ROOT / "docs" / "mgpu-status.txt").write_text(ANSI.sub("", text))
    render(text, ROOT / "docs" / "mgpu-status.png")
    print(ANSI.sub("", text))
    return 0


if __name__ == "__main__":
    sys.exit(main())

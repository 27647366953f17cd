"""Run a server command (``python -m sparktune.cli serve ...`` or ``python -m mlflow ...``) with a
sampling profiler inside its process: every ``--interval-ms`` a thread reads every other thread's
Python stack (``sys._current_frames``), and at exit it writes, per thread kind (the event loop,
the batch workers, MLflow's predict threads, other), how many samples each function was on the
stack (inclusive) and at the top (self), as JSON.

    python bench/serve_profile.py OUT.json -- -m sparktune.cli serve --model DIR --port 5000

A thread whose top frame is a wait (``select``, ``wait``, ``acquire``, ...) is idle; the rest of
its samples are CPU or GIL time. Sampling costs the server one short wake-up per interval.
"""

import atexit
import collections
import json
import runpy
import sys
import threading
import time
from types import FrameType

IDLE = {"select", "poll", "wait", "acquire", "_worker", "sleep", "accept", "readinto", "recv", "_wait_for_tstate_lock",
        "get", "epoll", "run_forever"}


def _kind(name: str) -> str:
    if name == "MainThread":
        return "event_loop"
    if name.startswith("sparktune-batch"):
        return "batch_worker"
    if name.startswith("asyncio") or name.startswith("AnyIO") or name.startswith("ThreadPoolExecutor"):
        return "predict_thread"
    return "other"


def main() -> None:
    out, interval = sys.argv[1], 0.005
    rest = sys.argv[sys.argv.index("--") + 1:]
    inclusive: dict = collections.defaultdict(collections.Counter)
    top: dict = collections.defaultdict(collections.Counter)
    samples: collections.Counter = collections.Counter()
    stop = threading.Event()

    def sample() -> None:
        me = threading.get_ident()
        while not stop.wait(interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, top_frame in sys._current_frames().items():
                if ident == me:
                    continue
                kind = _kind(names.get(ident, "?"))
                samples[kind] += 1
                code = top_frame.f_code
                top[kind][f"{code.co_name} ({code.co_filename.rsplit('/', 2)[-1]})"] += 1
                seen = set()
                frame: FrameType | None = top_frame
                while frame is not None:
                    key = f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-1]}:" \
                          f"{frame.f_code.co_firstlineno})"
                    if key not in seen:
                        inclusive[kind][key] += 1
                        seen.add(key)
                    frame = frame.f_back

    def dump() -> None:
        stop.set()
        report = {kind: {"samples": n, "interval_ms": interval * 1000,
                         "self": top[kind].most_common(40), "inclusive": inclusive[kind].most_common(300)}
                  for kind, n in samples.items()}
        with open(out, "w") as f:
            json.dump(report, f, indent=1)

    atexit.register(dump)
    threading.Thread(target=sample, daemon=True, name="profiler").start()
    time.sleep(0)
    if rest[0] != "-m":
        raise SystemExit("usage: serve_profile.py OUT.json -- -m MODULE ARGS...")
    sys.argv = [rest[1], *rest[2:]]
    runpy.run_module(rest[1], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()

"""The server's micro-batcher in one process, with the real pyfunc: no request waits for
companions longer than the batch window past its own arrival, and answers go to their requests."""

import asyncio
import time

import numpy as np
import pytest
from evalkit import build_classifier

WINDOW_S = 0.4


@pytest.fixture(scope="module")
def model(tmp_path_factory, minilm_path):
    import mlflow

    from sparktune.model import artifact

    base = tmp_path_factory.mktemp("batching")
    path = artifact.save_model(build_classifier(minilm_path, str(base / "clf")), str(base / "m"), "classification")
    return mlflow.pyfunc.load_model(path)


def test_no_request_waits_longer_than_the_window_past_its_arrival(model):
    import pandas as pd

    from sparktune.serve import MicroBatcher

    dispatched: list[tuple[float, int]] = []

    class Recording(MicroBatcher):
        def _score(self, texts, deadline):
            dispatched.append((time.monotonic(), len(texts)))
            return super()._score(texts, deadline)

    texts = [f"review number {i}: {'good ' * i}film" for i in range(6)]
    # Arrivals: three inside the first window, one just after it closes, two late ones.
    offsets = [0.0, 0.1, 0.3, WINDOW_S + 0.15, 1.5, 1.55]

    async def scenario():
        batcher = Recording(model, max_rows=100, max_wait_s=WINDOW_S)
        start = time.monotonic()

        async def ask(i):
            await asyncio.sleep(offsets[i])
            arrival = time.monotonic()
            records, rows = await batcher.predict([texts[i]], arrival + 60)
            return arrival - start, records, rows

        return start, await asyncio.gather(*(ask(i) for i in range(len(texts))))

    start, answers = asyncio.run(scenario())
    expected = model.predict(pd.DataFrame({"text": texts}))
    for i, (arrival, records, _rows) in enumerate(answers):
        # The batch holding request i was handed to the model within the window of its arrival.
        batch_start = min(t - start for t, _ in dispatched if t - start >= arrival - 1e-3)
        assert batch_start - arrival <= WINDOW_S + 0.05, (i, arrival, batch_start)
        np.testing.assert_allclose(records[0]["probabilities"], expected["probabilities"][i], atol=1e-5)
        assert len(records) == 1 and records[0]["label"] == expected["label"][i]
    # Requests inside one window were scored together, not one pass each.
    assert [rows for _, _, rows in answers][:3] == [3, 3, 3]
    assert sum(n for _, n in dispatched) == len(texts)


def test_several_workers_run_batches_at_once_and_route_each_answer_to_its_request(model):
    """With two workers two batches compute at the same time (never more), and every request still
    gets the rows of its own texts."""
    import threading

    import pandas as pd

    from sparktune.serve import MicroBatcher

    lock = threading.Lock()
    active, peak = [0], [0]

    class Overlapping(MicroBatcher):
        def _score(self, texts, deadline):
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.2)  # long enough that a second worker starts while this one computes
                return super()._score(texts, deadline)
            finally:
                with lock:
                    active[0] -= 1

    texts = [f"review {i}: {'fine ' * (3 * i)}{'awful' if i % 2 else 'great'} film" for i in range(6)]

    async def scenario():
        batcher = Overlapping(model, max_rows=1, max_wait_s=0.01, workers=2)
        return await asyncio.gather(*(batcher.predict([text], time.monotonic() + 60) for text in texts))

    answers = asyncio.run(scenario())
    expected = model.predict(pd.DataFrame({"text": texts}))
    assert peak[0] == 2
    for i, (records, rows) in enumerate(answers):
        assert rows == 1 and len(records) == 1
        np.testing.assert_allclose(records[0]["probabilities"], expected["probabilities"][i], atol=1e-5)


def test_int8_quantization_is_what_runs_and_answers_stay_close(tmp_path, minilm_path):
    """``quantize: int8`` (a load-time option, ``sparktune serve --quantize int8``) swaps every Linear
    for torch's dynamic int8 Linear, those modules compute the answers, and the probabilities stay
    near fp32's; int8 with bf16 forced on is refused."""
    import mlflow
    import pandas as pd
    import torch
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from sparktune.model import artifact
    from sparktune.serve import load_options

    path = artifact.save_model(build_classifier(minilm_path, str(tmp_path / "clf")), str(tmp_path / "m"),
                               "classification")
    fp32 = mlflow.pyfunc.load_model(path, model_config=load_options(path, {"bf16": "false"}))
    int8 = mlflow.pyfunc.load_model(path, model_config=load_options(path, {"quantize": "int8"}))
    core = int8.unwrap_python_model().core
    linears = [m for m in core.model.modules() if isinstance(m, torch.nn.Linear)]
    quantized = [m for m in core.model.modules() if isinstance(m, DynamicInt8Linear)]
    assert core.quantize == "int8" and core.bf16 is False
    assert not linears and len(quantized) == 6 * 6 + 2  # 6 layers x (q, k, v, out, up, down) + pooler + head
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in quantized]
    texts = ["A wonderful, moving film.", "Dull and far too long.", "I laughed; I cried; a great cast."]
    try:
        got = int8.predict(pd.DataFrame({"text": texts}))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls[0] >= len(quantized)
    want = fp32.predict(pd.DataFrame({"text": texts}))
    np.testing.assert_allclose(np.stack(got["probabilities"]), np.stack(want["probabilities"]), atol=0.05)
    with pytest.raises(Exception, match="set bf16 to false or auto"):
        mlflow.pyfunc.load_model(path, model_config=load_options(path, {"quantize": "int8", "bf16": "true"}))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, minilm_path):
    from sparktune.model import artifact

    base = tmp_path_factory.mktemp("batching_procs")
    return artifact.save_model(build_classifier(minilm_path, str(base / "clf")), str(base / "m"), "classification")


def test_worker_processes_answer_as_the_model_in_process_and_recover_from_a_killed_worker(model_dir):
    """Batches scored in worker processes (each its own model copy) equal the in-process model's
    answer; a deadline already past stops the batch (TimeoutError); a killed worker is replaced by
    a fresh process before its next batch."""
    import os
    import signal

    import mlflow
    import pandas as pd

    from sparktune.serve_workers import ModelProcesses

    texts = [f"review {i}: {'fine ' * (5 * i)}{'awful' if i % 2 else 'great'} film" for i in range(5)]
    expected = mlflow.pyfunc.load_model(model_dir).predict(pd.DataFrame({"text": texts}))
    workers = ModelProcesses(model_dir, {"torch_threads": 1}, 2)
    try:
        assert len(set(workers.pids)) == 2 and os.getpid() not in workers.pids
        for records in (workers.score(texts, time.monotonic() + 60), workers.score(texts[:2], time.monotonic() + 60)):
            for i, record in enumerate(records):
                assert record["label"] == expected["label"][i]
                np.testing.assert_allclose(record["probabilities"], expected["probabilities"][i], atol=1e-5)
        with pytest.raises(TimeoutError):
            workers.score(texts, time.monotonic() - 1)
        killed = workers.pids
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        records = workers.score(texts[:1], time.monotonic() + 60)
        assert records[0]["label"] == expected["label"][0]
        assert set(workers.pids) - set(killed), "no fresh worker process took a killed one's place"
    finally:
        workers.close()


def test_a_model_that_does_not_load_stops_the_worker_processes_with_a_clear_error(tmp_path):
    from sparktune.errors import SparktuneError
    from sparktune.serve_workers import ModelProcesses

    with pytest.raises(SparktuneError, match="could not load the model.*--batch-worker-kind thread"):
        ModelProcesses(str(tmp_path / "no-model"), None, 1)


def test_processes_only_where_they_pay_and_fit():
    from sparktune.serve_workers import WorkerKind, choose_worker_kind

    gb = 1 << 30
    auto = WorkerKind.AUTO
    assert choose_worker_kind(auto, 2, "cpu", gb // 10, 8 * gb) == WorkerKind.PROCESS
    assert choose_worker_kind(auto, 1, "cpu", gb // 10, 8 * gb) == WorkerKind.THREAD  # nothing runs beside it
    assert choose_worker_kind(auto, 2, "cuda", gb // 10, 8 * gb) == WorkerKind.THREAD
    assert choose_worker_kind(auto, 2, "cpu", 2 * gb, 8 * gb) == WorkerKind.THREAD  # 3 copies > half of 8 GB
    assert choose_worker_kind(WorkerKind.PROCESS, 2, "cuda", 2 * gb, 8 * gb) == WorkerKind.PROCESS
    assert choose_worker_kind(WorkerKind.THREAD, 2, "cpu", 1, 8 * gb) == WorkerKind.THREAD

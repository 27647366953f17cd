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
            frame, rows = await batcher.predict([texts[i]], arrival + 60)
            return arrival - start, frame, rows

        return start, await asyncio.gather(*(ask(i) for i in range(len(texts))))

    start, answers = asyncio.run(scenario())
    expected = model.predict(pd.DataFrame({"text": texts}))
    for i, (arrival, frame, _rows) in enumerate(answers):
        # The batch holding request i was handed to the model within the window of its arrival.
        batch_start = min(t - start for t, _ in dispatched if t - start >= arrival - 1e-3)
        assert batch_start - arrival <= WINDOW_S + 0.05, (i, arrival, batch_start)
        np.testing.assert_allclose(frame["probabilities"][0], expected["probabilities"][i], atol=1e-5)
        assert len(frame) == 1
    # Requests inside one window were scored together, not one pass each.
    assert [rows for _, _, rows in answers][:3] == [3, 3, 3]
    assert sum(n for _, n in dispatched) == len(texts)

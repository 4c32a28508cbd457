"""The request batcher: batches by key and size, a bounded queue, timeouts, failures kept to their call."""

import asyncio
import threading
import time

import pytest

from maskrcnn.serve.batcher import Batcher, QueueFull


class Recorder:
    """A model stand-in that records its calls; ``delay`` seconds per call, fails on items named 'bad'."""

    def __init__(self, delay=0.0):
        self.calls, self.delay, self.threads = [], delay, set()

    def __call__(self, items):
        self.threads.add(threading.get_ident())
        self.calls.append(list(items))
        time.sleep(self.delay)
        if "bad" in items:
            raise RuntimeError("the model failed")
        return [f"result of {item}" for item in items]


def _run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_are_batched_by_key_up_to_max_batch():
    rec = Recorder(delay=0.05)

    async def main():
        b = Batcher(rec, max_batch=3, max_wait=0.05, max_queue=100)
        await b.start()
        items = [(f"a{k}", "A") for k in range(5)] + [(f"b{k}", "B") for k in range(2)]
        results = await asyncio.gather(*(b.submit(item, key) for item, key in items))
        await b.stop()
        return results

    results = _run(main())
    assert results == [f"result of {x}" for x in [f"a{k}" for k in range(5)] + ["b0", "b1"]]
    assert all(len(call) <= 3 for call in rec.calls)
    for call in rec.calls:  # one key per call: images of one size only
        assert len({item[0] for item in call}) == 1
    assert sorted(x for call in rec.calls for x in call) == sorted([f"a{k}" for k in range(5)] + ["b0", "b1"])
    assert len(rec.calls) <= 4  # 5 A in two calls, 2 B in one or two
    assert len(rec.threads) == 1  # one model thread


def test_a_full_queue_refuses_at_once_and_a_slow_model_times_out():
    rec = Recorder(delay=0.3)

    async def main():
        b = Batcher(rec, max_batch=1, max_wait=0, max_queue=2, timeout=0.2)
        await b.start()
        first = asyncio.create_task(b.submit("x0"))
        await asyncio.sleep(0.02)  # x0 is in the model now; two more fill the queue
        waiting = [asyncio.create_task(b.submit(f"x{k}")) for k in (1, 2)]
        await asyncio.sleep(0.01)
        with pytest.raises(QueueFull, match="the queue holds 2"):
            await b.submit("x3")
        outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
        await asyncio.sleep(0.5)
        await b.stop()
        return outcomes

    outcomes = _run(main())
    assert all(isinstance(o, TimeoutError) for o in outcomes), outcomes  # 0.3 s model, 0.2 s timeout
    # x0 reached the model; x2 was given up before its turn and never ran
    ran = [x for call in rec.calls for x in call]
    assert "x0" in ran and "x2" not in ran


def test_a_failing_call_fails_its_own_requests_and_the_worker_goes_on():
    rec = Recorder()

    async def main():
        b = Batcher(rec, max_batch=4, max_wait=0.02)
        await b.start()
        bad = await asyncio.gather(b.submit("bad", "K"), b.submit("good", "K"), return_exceptions=True)
        after = await b.submit("later", "K")
        await b.stop()
        return bad, after

    bad, after = _run(main())
    assert all(isinstance(o, RuntimeError) and "the model failed" in str(o) for o in bad)
    assert after == "result of later"


def test_settings_are_checked():
    with pytest.raises(ValueError, match="max_batch"):
        Batcher(Recorder(), max_batch=0)
    with pytest.raises(RuntimeError, match="start"):
        _run(Batcher(Recorder()).submit("x"))

"""The queue that turns concurrent requests into batches, and where each image is finished after its forward."""

import asyncio
import io
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from service.batcher import Batcher
from service.decode import Decoded
from service.pipeline import Options, Work, finish
from service.predictor import Predictor

from ..conftest import IMAGE, forward_passes, make_client, post


def test_concurrent_requests_are_batched(checkpoint):
    with make_client(checkpoint, max_batch_size=8, max_batch_wait_ms=200) as c:
        before = forward_passes()
        png = IMAGE.read_bytes()
        statuses = []
        threads = [threading.Thread(target=lambda: statuses.append(post(c, png).status_code)) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert statuses == [200] * 8
        calls = forward_passes() - before
        assert 1 <= calls < 8
        metrics = c.get("/metrics").text
        assert 'segment_requests_total{method="POST",route="/segment",status="200"}' in metrics
        assert "segment_batch_size_bucket" in metrics and "segment_queue_depth" in metrics


def work(predictor: Predictor, im: Image.Image, lane) -> Work:
    """One image as the pipeline hands it to the batcher."""
    return Work(Decoded(np.array(im), im.size), Options(), lane, False, predictor, 0.5)


@pytest.mark.parametrize("post_threads", [0, 2])
def test_batched_results_match_one_image_at_a_time(checkpoint, post_threads):
    """The worker's batches, postprocessed on the inference thread (CUDA's way) or on other threads while the
    next forward runs (the CPU's way), give each request exactly the mask and counts it gets alone."""
    predictor = Predictor.load(checkpoint, "cpu")
    images = [Image.open(IMAGE).convert("RGB").resize(size) for size in [(96, 72), (50, 40), (130, 90)]]
    tensors = [predictor.preprocess(im) for im in images]
    alone = [predictor.predict(t[None], [(im.height, im.width)])[0] for t, im in zip(tensors, images, strict=True)]

    async def batched():
        post = ThreadPoolExecutor(post_threads) if post_threads else None
        batcher = Batcher(predictor, max_batch_size=8, max_wait_ms=500, queue_size=8, finish=finish, helpers=post)
        with batcher.arriving():  # all three are queued before the worker looks: one batch
            jobs = [batcher.enqueue(t, work(predictor, im, post)) for t, im in zip(tensors, images, strict=True)]
            batcher.start()
        results = await asyncio.gather(*(j.future for j in jobs))
        await batcher.drain()
        return results

    before = forward_passes()
    results = asyncio.run(batched())
    assert forward_passes() - before == 1
    for done, want, im in zip(results, alone, images, strict=True):
        got = done.prediction
        assert (done.encoded is None) == (post_threads == 0)  # CUDA's way: the pipeline encodes on the lane
        assert got.mask.shape == (im.height, im.width) and sum(got.counts) == im.width * im.height
        assert got.counts == np.bincount(got.mask.ravel(), minlength=12).tolist()
        assert (got.mask == want.mask).mean() > 0.999  # batch 3 vs 1 may round differently at exact ties


def test_a_lone_request_is_postprocessed_at_once_on_the_idle_cores_and_a_batch_on_the_codec_threads(checkpoint):
    """At low load the inference thread postprocesses and encodes its lone image itself, helped by a codec thread
    (one hop and a one-thread postprocess fewer); under load the logits go to the codec threads so that the next
    forward starts at once. Either way: the mask and counts of predict() alone, and the answer's encoding done."""
    predictor = Predictor.load(checkpoint, "cpu")
    images = [Image.open(IMAGE).convert("RGB").resize(size) for size in [(96, 72), (50, 40), (130, 90)]]
    tensors = [predictor.preprocess(im) for im in images]
    alone = [predictor.predict(t[None], [(im.height, im.width)])[0] for t, im in zip(tensors, images, strict=True)]
    where = {}

    def finish_where(w, logits, helpers=None, parts=1):  # the pipeline's own `finish`, noting the thread it ran on
        where[id(w)] = threading.current_thread().name
        return finish(w, logits, helpers, parts)

    async def run():
        codec = ThreadPoolExecutor(1, thread_name_prefix="codec")
        batcher = Batcher(predictor, max_batch_size=8, max_wait_ms=500, queue_size=8, finish=finish_where,
                          helpers=codec, post_helpers=1)
        batcher.start()
        lone = batcher.enqueue(tensors[0], work(predictor, images[0], codec))
        await lone.future
        with batcher.arriving():  # three queued at once: one batch, under load
            jobs = [batcher.enqueue(t, work(predictor, im, codec)) for t, im in zip(tensors, images, strict=True)]
        await asyncio.gather(*(j.future for j in jobs))
        await batcher.drain()
        codec.shutdown()
        return lone, jobs

    lone, jobs = asyncio.run(run())
    assert where[id(lone.work)].startswith("inference")
    done = lone.future.result()
    assert np.array_equal(done.prediction.mask, alone[0].mask) and done.prediction.counts == alone[0].counts
    assert np.array_equal(np.array(Image.open(io.BytesIO(done.encoded.png))), alone[0].mask)  # encoded there too
    for job, want in zip(jobs, alone, strict=True):
        assert where[id(job.work)].startswith("codec")
        assert (job.future.result().prediction.mask == want.mask).mean() > 0.999  # batch 3 vs 1: ties may round


def test_a_lone_request_does_not_wait_for_a_batch(checkpoint):
    # A 3-second batch window only applies while other requests are queued or uploading: alone, a request
    # goes straight to the model.
    with make_client(checkpoint, max_batch_wait_ms=3000) as c:
        r = post(c, IMAGE.read_bytes())
        assert r.status_code == 200 and r.json()["timings_ms"]["queue"] < 1000

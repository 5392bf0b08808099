"""The queue that turns concurrent requests into batches for the workers that run the network: one on CUDA and
with torch, `streams` on a CPU ONNX backend (each forward then runs beside the others, on its share of the cores).

What follows a forward is the pipeline's `finish` (postprocess and encode, pipeline.py), given once; the batcher only
decides where it runs: on a CPU, on the inference thread for a lone image (its mask split over idle codec threads),
else on the image's lane; on CUDA the inference thread postprocesses the whole batch and the pipeline encodes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .encode import Finished
from .metrics import BATCH_SIZE, INFERENCE_SECONDS, QUEUE_DEPTH
from .predictor import Predictor

if TYPE_CHECKING:
    from .pipeline import Work

    Finish = Callable[[Work, torch.Tensor, Executor | None, int], Finished]


class QueueFull(Exception):
    """Back-pressure: the service is at capacity; the client should retry later."""


@dataclass
class Job:
    tensor: torch.Tensor  # (3, h, w) preprocessed
    work: Work  # what the stages after the forward need; its result: a Finished, on `future`
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)
    started: float = 0.0  # when its batch began on the device


class Batcher:
    def __init__(self, predictor: Predictor, max_batch_size: int, max_wait_ms: float, queue_size: int,
                 finish: Finish, helpers: Executor | None = None, post_helpers: int = 0):
        """finish: the pipeline's postprocess + encode of one image's logits (CPU). On CUDA (`helpers` None) the
        inference thread postprocesses the batch itself, a few kernels, and the result goes back unencoded.

        helpers: the codec threads (CPU). post_helpers: how many of them may help a lone image's postprocess when
        nothing else waits for the cores: it then runs on the inference thread at once, split in 1 + post_helpers
        bands, the others on `helpers` (the same mask, sooner). Under load each image is finished on its own lane
        while the next forward runs."""
        self.predictor, self.finish, self.helpers = predictor, finish, helpers
        self.post_parts = 1 + post_helpers if helpers is not None else 1
        self.max_batch_size, self.max_wait = max_batch_size, max_wait_ms / 1000
        self.queue: asyncio.Queue[Job] = asyncio.Queue(maxsize=queue_size)
        # One thread per stream: at most `streams` forwards overlap, and none blocks the event loop.
        self.streams = predictor.streams
        self.executor = ThreadPoolExecutor(max_workers=self.streams, thread_name_prefix="inference")
        self.tasks: list[asyncio.Task] = []
        self.running = 0  # forwards in progress
        self.incoming = 0  # requests being uploaded or decoded: they will join the queue soon
        self._pending: set[asyncio.Task] = set()  # postprocess tasks in flight (post_executor only)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._run(), name=f"batcher-{i}") for i in range(self.streams)]

    @contextmanager
    def arriving(self) -> Iterator[None]:
        """Wrap a request's upload and decode: while any is on its way, a forming batch waits for it."""
        self.incoming += 1
        try:
            yield
        finally:
            self.incoming -= 1

    def at_capacity(self) -> bool:
        """Every queue slot is taken or promised to a request still uploading: a new one would only wait to be
        refused, so it is refused before its body is read."""
        return self.queue.qsize() + self.incoming >= self.queue.maxsize

    def enqueue(self, tensor: torch.Tensor, work: Work) -> Job:
        """Queue one preprocessed image; its Finished arrives on `job.future`. Raises QueueFull."""
        job = Job(tensor, work, asyncio.get_running_loop().create_future())
        try:
            self.queue.put_nowait(job)
        except asyncio.QueueFull:
            raise QueueFull from None
        QUEUE_DEPTH.set(self.queue.qsize())
        return job

    async def _gather(self) -> list[Job]:
        """Up to max_batch_size jobs. The batch waits (at most max_wait) only while more requests are
        queued or on their way; a lone request goes straight to the device, so waiting never costs latency
        at low load."""
        jobs = [await self.queue.get()]
        deadline = time.perf_counter() + self.max_wait
        while len(jobs) < self.max_batch_size:
            if self.queue.empty() and self.incoming == 0:
                break
            timeout = deadline - time.perf_counter()
            try:
                jobs.append(self.queue.get_nowait() if timeout <= 0 else
                            await asyncio.wait_for(self.queue.get(), timeout))
            except (asyncio.QueueEmpty, TimeoutError):
                break
        QUEUE_DEPTH.set(self.queue.qsize())
        return [j for j in jobs if not j.future.done()]  # timed-out requests were cancelled: skip them

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = await self._gather()
            if not jobs:
                continue
            # one image (every CPU forward): a view, not a 1.7 MB copy on the event loop
            batch = jobs[0].tensor[None] if len(jobs) == 1 else torch.stack([j.tensor for j in jobs])
            t0 = time.perf_counter()
            for j in jobs:
                j.started = t0
            self.running += 1
            try:
                if self.helpers is None:  # CUDA: forward and postprocess in one go on the worker
                    done = await loop.run_in_executor(self.executor, self._forward_and_postprocess, batch, jobs)
                    seconds = time.perf_counter() - t0
                else:  # CPU: the forward; a lone image finished at once, on this thread
                    logits, done, seconds = await loop.run_in_executor(self.executor, self._forward, batch, jobs)
            except Exception as e:  # a failed forward must fail its requests, not kill the worker
                self._fail(jobs, e)
                continue
            finally:
                self.running -= 1
            INFERENCE_SECONDS.observe(seconds)
            BATCH_SIZE.observe(len(jobs))
            if done is not None:
                for j, d in zip(jobs, done, strict=True):
                    if not j.future.done():
                        j.future.set_result(d)
            else:  # under load: each image finished on its lane while the next forward runs
                for j, x in zip(jobs, logits, strict=True):
                    self._pending.add(t := asyncio.create_task(self._finish_on_lane(j, x)))
                    t.add_done_callback(self._pending.discard)

    def _forward_and_postprocess(self, batch: torch.Tensor, jobs: list[Job]) -> list[Finished]:
        """On the inference thread (CUDA): the batch's forward, then each image's mask and counts on the device."""
        results = self.predictor.predict(batch, [j.work.size for j in jobs], [j.work.options.confidence for j in jobs])
        return [Finished(r, None) for r in results]

    def _forward(self, batch: torch.Tensor, jobs: list[Job]) -> tuple[torch.Tensor, list[Finished] | None, float]:
        """On an inference thread (CPU): the forward, then, if nothing else waits for the cores, the lone image's
        `finish` right here in post_parts bands: one hop and a single-threaded postprocess fewer on its way.
        Under load (a queue, an upload on its way, another forward) the logits go back for the lanes.
        Returns the logits, the finished image or None, and the forward's own seconds."""
        t0 = time.perf_counter()
        logits = self.predictor.forward(batch, self.running)
        seconds = time.perf_counter() - t0
        if (len(jobs) == 1 and self.post_parts > 1 and not jobs[0].work.large and self.running <= 1
                and self.queue.empty() and self.incoming == 0):  # (read off the loop: a hint, never a guarantee)
            return logits, [self.finish(jobs[0].work, logits[0], self.helpers, self.post_parts)], seconds
        return logits, None, seconds

    async def _finish_on_lane(self, job: Job, logits: torch.Tensor) -> None:
        if job.future.done():
            return
        try:
            done = await asyncio.get_running_loop().run_in_executor(job.work.lane, self.finish, job.work, logits)
        except Exception as e:
            self._fail([job], e)
            return
        if not job.future.done():
            job.future.set_result(done)

    @staticmethod
    def _fail(jobs: list[Job], e: Exception) -> None:
        for j in jobs:
            if not j.future.done():
                j.future.set_exception(e)

    async def drain(self) -> None:
        """Let every accepted request finish, then stop the worker (graceful shutdown)."""
        while not self.queue.empty() and any(not t.done() for t in self.tasks):
            await asyncio.sleep(0.01)
        while self.running:  # forwards already on the device finish and hand their results over
            await asyncio.sleep(0.01)
        for t in self.tasks:
            t.cancel()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        while not self.queue.empty():  # only when the worker died: fail what it left, never hang
            job = self.queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(RuntimeError("the service is shutting down"))
        self.executor.shutdown(wait=True)

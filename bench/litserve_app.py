"""LitServe serving the same checkpoint with the same decode / preprocess / postprocess and the same response builder
as the service.

Started by bench/serve.py as `python bench/litserve_app.py CHECKPOINT PORT MAX_BATCH WAIT_MS`.
"""

from __future__ import annotations

import sys
import time
import uuid
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.decode import decode_upload  # noqa: E402
from service.encode import mask_png  # noqa: E402
from service.predictor import Predictor  # noqa: E402
from service.schemas import Timings, model_ref, ms, segment_response  # noqa: E402


class SegmentAPI(ls.LitAPI):
    def setup(self, device):
        self.predictor = Predictor.load(Path(sys.argv[1]), "cuda" if "cuda" in str(device) else "cpu", backend="auto")
        self.predictor.warmup(2, self.max_batch_size)

    def decode_request(self, request):
        t0 = time.perf_counter()
        upload = decode_upload(request["image"].file.read(), 40_000_000,
                               shrink_to=max(self.predictor.meta.input_size))
        tensor = self.predictor.preprocess(upload.image)
        return upload.size, tensor, time.perf_counter() - t0

    def batch(self, inputs):
        return [i[0] for i in inputs], torch.stack([i[1] for i in inputs]), [i[2] for i in inputs]

    def predict(self, x):
        t0 = time.perf_counter()
        if self.max_batch_size == 1:  # LitServe skips batch()/unbatch(): x is one decode_request() result
            (width, height), tensor, decode = x
            result = self.predictor.predict(tensor[None], [(height, width)])[0]
            return (width, height), result, decode, time.perf_counter() - t0
        sizes, batch, decodes = x
        results = self.predictor.predict(batch, [(h, w) for w, h in sizes])
        inference = time.perf_counter() - t0
        return [(wh, r, d, inference) for wh, r, d in zip(sizes, results, decodes, strict=True)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        (width, height), result, decode, inference = output
        t0 = time.perf_counter()
        png = mask_png(result.mask, self.predictor.meta.classes.palette())
        # a LitAPI does not see its queue: that wait is reported as 0 (the bench reads only HTTP timings)
        timings = Timings(decode=ms(decode), queue=0.0, inference=ms(inference), encode=ms(time.perf_counter() - t0))
        return segment_response(width, height, png, result, self.predictor.meta.classes,
                                model_ref(self.predictor.checkpoint, self.predictor.backend.name,
                                          self.predictor.precision), timings, uuid.uuid4().hex).model_dump()


if __name__ == "__main__":
    api = SegmentAPI(max_batch_size=int(sys.argv[3]), batch_timeout=float(sys.argv[4]) / 1000, api_path="/segment")
    server = ls.LitServer(api, accelerator="auto", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")

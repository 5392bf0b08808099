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

from service.decode import decode_image  # noqa: E402
from service.predictor import Predictor, mask_png  # noqa: E402
from service.schemas import Timings, model_ref, ms, segment_response  # noqa: E402


class SegmentAPI(ls.LitAPI):
    def setup(self, device):
        self.predictor = Predictor.load(Path(sys.argv[1]), "cuda" if "cuda" in str(device) else "cpu", backend="auto")
        self.predictor.warmup(2, self.max_batch_size)

    def decode_request(self, request):
        t0 = time.perf_counter()
        image = decode_image(request["image"].file.read(), 40_000_000)
        tensor = self.predictor.preprocess(image)
        return image, tensor, time.perf_counter() - t0

    def batch(self, inputs):
        return [i[0] for i in inputs], torch.stack([i[1] for i in inputs]), [i[2] for i in inputs]

    def predict(self, x):
        t0 = time.perf_counter()
        if self.max_batch_size == 1:  # LitServe skips batch()/unbatch(): x is one decode_request() result
            image, tensor, decode = x
            result = self.predictor.predict(tensor[None], [(image.height, image.width)])[0]
            return image, result, decode, time.perf_counter() - t0
        images, batch, decodes = x
        results = self.predictor.predict(batch, [(im.height, im.width) for im in images])
        inference = time.perf_counter() - t0
        return [(im, r, d, inference) for im, r, d in zip(images, results, decodes, strict=True)]

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        image, result, decode, inference = output
        t0 = time.perf_counter()
        png = mask_png(result.mask, self.predictor.meta.classes.palette())
        # a LitAPI does not see its queue: that wait is reported as 0 (the bench reads only HTTP timings)
        timings = Timings(decode=ms(decode), queue=0.0, inference=ms(inference), encode=ms(time.perf_counter() - t0))
        return segment_response(image.width, image.height, png, result, self.predictor.meta.classes,
                                model_ref(self.predictor.checkpoint, self.predictor.backend.name,
                                          self.predictor.precision), timings, uuid.uuid4().hex).model_dump()


if __name__ == "__main__":
    api = SegmentAPI(max_batch_size=int(sys.argv[3]), batch_timeout=float(sys.argv[4]) / 1000, api_path="/segment")
    server = ls.LitServer(api, accelerator="auto", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")

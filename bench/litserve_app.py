"""LitServe serving the same checkpoint with the same decode / preprocess / postprocess as the service.

Started by bench/serve.py as `python bench/litserve_app.py CHECKPOINT PORT MAX_BATCH WAIT_MS`.
"""

from __future__ import annotations

import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.decode import decode_image  # noqa: E402
from service.predictor import Predictor, b64, mask_png  # noqa: E402


class SegmentAPI(ls.LitAPI):
    def setup(self, device):
        self.predictor = Predictor.load(Path(sys.argv[1]), "cuda" if "cuda" in str(device) else "cpu")
        self.predictor.warmup(2, self.max_batch_size)

    def decode_request(self, request):
        image = decode_image(request["image"].file.read(), 40_000_000)
        return image, self.predictor.preprocess(image)

    def batch(self, inputs):
        return [i[0] for i in inputs], torch.stack([i[1] for i in inputs])

    def predict(self, x):
        if self.max_batch_size == 1:  # LitServe skips batch()/unbatch(): x is one decode_request() result
            image, tensor = x
            return image, self.predictor.predict(tensor[None], [(image.height, image.width)])[0]
        images, batch = x
        return list(zip(images, self.predictor.predict(batch, [(im.height, im.width) for im in images]),
                        strict=True))

    def unbatch(self, output):
        return output

    def encode_response(self, output):
        image, result = output
        classes = self.predictor.meta.classes
        total = image.width * image.height
        return {"width": image.width, "height": image.height, "mask": b64(mask_png(result.mask, classes.palette())),
                "classes": [{"index": i, "name": n, "pixels": p, "fraction": p / total}
                            for i, (n, p) in enumerate(zip(classes.names, result.counts, strict=True))]}


if __name__ == "__main__":
    api = SegmentAPI(max_batch_size=int(sys.argv[3]), batch_timeout=float(sys.argv[4]) / 1000, api_path="/segment")
    server = ls.LitServer(api, accelerator="auto", workers_per_device=1, timeout=60)
    server.run(host="127.0.0.1", port=int(sys.argv[2]), generate_client_file=False, log_level="warning")

"""A new model without a restart (service/swap.py): swapped under load, no request lost, bad files refused."""

import contextlib
import os
import shutil
import subprocess
import threading
import time

import httpx
import torch

from models.checkpoint import load_checkpoint, save_checkpoint
from models.unet import UNet
from tests.conftest import IMAGE, checkpoint  # noqa: F401
from tests.live import start_service


def another_model(source, path):
    """The same architecture and classes with other weights: another sha256, other masks."""
    meta = load_checkpoint(source).meta
    torch.manual_seed(1)
    return save_checkpoint(path, UNet(meta.model), meta)


@contextlib.contextmanager
def under_load(base, key, clients=8):
    """`clients` threads posting IMAGE to /segment back to back while the block runs; yields their answers as
    (status, model sha256), in the order they came."""
    answers, stop = [], threading.Event()

    def client():
        with httpx.Client(headers={"X-API-Key": key}, timeout=30) as c:
            while not stop.is_set():
                r = c.post(f"{base}/segment", files={"image": ("x.png", IMAGE.read_bytes())})
                answers.append((r.status_code, r.json().get("model", {}).get("sha256")))

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    try:
        yield answers
    finally:
        stop.set()
        for t in threads:
            t.join(30)


def test_a_reload_swaps_the_model_under_load_without_losing_a_request(checkpoint, tmp_path):  # noqa: F811
    serving = shutil.copy(checkpoint, tmp_path / "model.safetensors")
    old, new = load_checkpoint(serving).sha256, load_checkpoint(another_model(checkpoint, tmp_path / "b.safetensors")
                                                                ).sha256
    proc, base, _ = start_service({"SEGMENT_CHECKPOINT": str(serving), "SEGMENT_DEVICE": "cpu",
                                   "SEGMENT_BACKEND": "torch", "SEGMENT_WARMUP_PASSES": "1",
                                   "SEGMENT_ADMIN_KEYS": "admin-key", "SEGMENT_API_KEYS": "client-key",
                                   "SEGMENT_LOG_LEVEL": "warning"}, stderr=subprocess.PIPE, text=True)
    admin = {"X-API-Key": "admin-key"}
    try:
        with under_load(base, "client-key") as answers:
            time.sleep(10)  # ~30 s of load at concurrency 8 around the swap
            # the client key is not an admin key; the same file again changes nothing
            assert httpx.post(f"{base}/models/reload", headers={"X-API-Key": "client-key"}).status_code == 401
            assert httpx.post(f"{base}/models/reload", headers=admin, timeout=60).json() == {"changed": False,
                                                                                           "sha256": old}
            os.replace(tmp_path / "b.safetensors", serving)  # the operator's atomic rename
            swapped = httpx.post(f"{base}/models/reload", headers=admin, timeout=60).json()
            assert swapped["changed"] and (swapped["previous"], swapped["sha256"]) == (old, new)
            time.sleep(10)
            # a file that cannot be served is refused, and the model serving keeps serving
            serving.write_bytes(b"not a checkpoint")
            refused = httpx.post(f"{base}/models/reload", headers=admin, timeout=60)
            assert refused.status_code == 422 and refused.json()["code"] == "bad_checkpoint"
            time.sleep(8)
        assert httpx.get(f"{base}/model").json()["sha256"] == new
    finally:
        proc.terminate()
        proc.wait(30)
    assert answers and all(status == 200 for status, _ in answers), {s for s, _ in answers}
    served = [sha for _, sha in answers]
    assert set(served) == {old, new}
    first_new = served.index(new)
    # one switch: after the first answer from the new model, only requests already in flight on the old one (at
    # most one per client) come back from it. (How many new answers come between depends on the cores' load.)
    assert served[first_new:].count(old) <= 8
    log = proc.stderr.read()
    assert "reload refused" in log and "Traceback" not in log


def test_model_management_is_off_without_admin_keys(checkpoint):  # noqa: F811
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    with TestClient(create_app(Settings(checkpoint=checkpoint, device="cpu", backend="torch",
                                        warmup_passes=0))) as c:
        r = c.post("/models/reload")
        assert r.status_code == 403 and r.json()["code"] == "admin_disabled"


def test_a_models_folder_serves_each_model_by_name_and_lists_the_ones_it_could_not(checkpoint, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    folder = tmp_path / "models"
    folder.mkdir()
    other = load_checkpoint(another_model(checkpoint, folder / "other.safetensors")).sha256
    (folder / "broken.safetensors").write_bytes(b"\x80\x04 a pickle, renamed")
    settings = Settings(checkpoint=checkpoint, models_dir=folder, device="cpu", backend="torch", warmup_passes=0)
    with TestClient(create_app(settings)) as c:
        listed = {m["name"]: m for m in c.get("/models").json()["models"]}
        assert listed["tiny"]["default"] and listed["other"]["state"] == "ready"
        assert listed["other"]["sha256"] == other and listed["other"]["classes"] == listed["tiny"]["classes"]
        assert listed["broken"]["state"] == "failed" and "CheckpointError" in listed["broken"]["why"]
        data = IMAGE.read_bytes()
        by_name = c.post("/segment?model=other", files={"image": ("x.png", data)}).json()
        assert by_name["model"]["sha256"] == other
        default = c.post("/segment", files={"image": ("x.png", data)}).json()
        assert default["model"]["sha256"] == load_checkpoint(checkpoint).sha256
        r = c.post("/segment?model=broken", files={"image": ("x.png", data)})
        assert r.status_code == 404 and "CheckpointError" in r.json()["detail"]
        assert c.post("/segment?model=../etc", files={"image": ("x.png", data)}).status_code == 422
        assert c.get("/v2/models/other/ready").status_code == 200
        assert 'segment_serving{backend="torch",device="cpu",model="other",precision="float32"} 1.0' in \
            c.get("/metrics").text


def test_models_are_added_replaced_and_removed_at_run_time_by_an_admin(checkpoint, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    folder = tmp_path / "models"
    folder.mkdir()
    first = another_model(checkpoint, tmp_path / "first.safetensors")
    admin = {"X-API-Key": "admin"}
    settings = Settings(checkpoint=checkpoint, models_dir=folder, device="cpu", backend="torch", warmup_passes=0,
                        admin_keys="admin", max_model_bytes=60 * 2**20)
    with TestClient(create_app(settings)) as c:
        data = IMAGE.read_bytes()
        put = c.put("/models/street", content=first.read_bytes(), headers=admin).json()
        assert put == {"name": "street", "outcome": "loaded", "sha256": load_checkpoint(first).sha256,
                       "backend": "torch", "precision": "float32"}
        assert (folder / "street.safetensors").read_bytes() == first.read_bytes()
        answer = c.post("/segment?model=street", files={"image": ("x.png", data)}).json()
        assert answer["model"] == {**answer["model"], "name": "street.safetensors", "sha256": put["sha256"]}
        # a broken upload, one over the cap, a bad name: refused, the version serving keeps serving
        r = c.put("/models/street", content=b"\x80\x04 pickled", headers=admin)
        assert r.status_code == 422 and r.json()["code"] == "bad_checkpoint"
        big = c.put("/models/street", content=b"x" * (61 * 2**20), headers=admin)
        assert big.status_code == 413
        assert c.put("/models/tiny", content=first.read_bytes(), headers=admin).status_code == 422
        assert c.put("/models/street", content=first.read_bytes()).status_code == 401
        assert c.post("/segment?model=street", files={"image": ("x.png", data)}).json()["model"]["sha256"] == \
            put["sha256"]
        assert sorted(p.name for p in folder.iterdir()) == ["street.safetensors"]  # no upload left behind
        # the default model cannot be removed; another can
        assert c.delete("/models/tiny", headers=admin).status_code == 409
        assert c.delete("/models/street", headers=admin).json() == {"name": "street", "outcome": "unloaded"}
        assert c.post("/segment?model=street", files={"image": ("x.png", data)}).status_code == 404
        assert not (folder / "street.safetensors").exists()
        # a file dropped into the folder, then POST /models/reload
        another_model(checkpoint, folder / "dropped.safetensors")
        assert c.post("/models/reload", headers=admin).json()["models"] == {"dropped": "loaded"}
        assert c.post("/models/reload", headers=admin).json()["models"] == {"dropped": "unchanged"}


def test_the_watcher_serves_a_file_dropped_into_the_folder(checkpoint, tmp_path):  # noqa: F811
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    folder = tmp_path / "models"
    folder.mkdir()
    settings = Settings(checkpoint=checkpoint, models_dir=folder, device="cpu", backend="torch", warmup_passes=0,
                        models_watch_s=0.2)
    with TestClient(create_app(settings)) as c:
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["tiny"]
        another_model(checkpoint, folder / "dropped.safetensors")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(c.get("/models").json()["models"]) < 2:
            time.sleep(0.2)
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["tiny", "dropped"]
        (folder / "dropped.safetensors").unlink()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(c.get("/models").json()["models"]) > 1:
            time.sleep(0.2)
        assert [m["name"] for m in c.get("/models").json()["models"]] == ["tiny"]
        from service.metrics import REGISTRY

        def images() -> float:
            return REGISTRY.get_sample_value("segment_model_images_total", {"model": "tiny"}) or 0.0

        before = images()
        c.post("/segment", files={"image": ("x.png", IMAGE.read_bytes())})
        assert images() == before + 1

"""SEGMENT_PRECISION on a CPU: int8 and bf16 from the shipped model's precision card, and fp32 whenever the card,
the int8 model or the CPU does not hold (service/precisions.py, models/precision.py)."""

import base64
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from models import precision
from models.checkpoint import load_checkpoint
from models.precision import SANITY_PHOTO, CardError, card_path, int8_path, read_card
from service import selection
from service.app import create_app
from service.predictor import Predictor
from service.settings import Settings
from tests.conftest import SHIPPED


@pytest.fixture
def shipped(tmp_path):
    """The shipped checkpoint with its card and int8 model, in a folder a test may break."""
    for source in (SHIPPED, card_path(SHIPPED), int8_path(SHIPPED)):
        shutil.copy(source, tmp_path / source.name)
    return tmp_path / SHIPPED.name


def served(client, data: bytes) -> tuple[np.ndarray, dict]:
    r = client.post("/segment", files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    body = r.json()
    mask = np.array(Image.open(io.BytesIO(base64.b64decode(body["mask"]))))
    return mask, body


# Without VNNI the int8 kernels (u8 x s8 products summed in saturating int16) round far more: the shipped int8
# model's masks agree with fp32's on 97.0% (OpenVINO) and 89% (ONNX Runtime) of the street photo's pixels on the
# AVX2 EPYC, against 98.6-99.6% with VNNI. The start-up check refuses them there (the test below).
@pytest.mark.skipif("int8" not in precision.native_precisions(), reason="this CPU has no VNNI or AMX")
def test_int8_by_name_serves_the_cards_int8_model_and_every_answer_says_so(shipped, tmp_path):
    photo = SANITY_PHOTO.read_bytes()
    with TestClient(create_app(Settings(checkpoint=shipped, device="cpu", backend="openvino", precision="fp32",
                                        cache_dir=tmp_path, warmup_passes=0))) as client:
        reference, body = served(client, photo)
        assert body["model"]["precision"] == "float32"
    with TestClient(create_app(Settings(checkpoint=shipped, device="cpu", backend="openvino", precision="int8",
                                        cache_dir=tmp_path, warmup_passes=0))) as client:
        info = client.get("/model").json()
        assert (info["backend"], info["precision"]) == ("openvino", "int8")
        scores = json.loads(card_path(shipped).read_text())["scores"]
        card = f"precision card: mIoU fp32 {scores['fp32']['mean_iou']:.4f}, int8 {scores['int8']['mean_iou']:.4f}"
        assert any(n.startswith(card) for n in info["backend_notes"]), info["backend_notes"]
        mask, body = served(client, photo)
        assert body["model"]["precision"] == "int8"
        assert sum(c["pixels"] for c in body["classes"]) == 480 * 360 == mask.size
        assert (mask == reference).mean() >= 0.97  # the same street, segmented as fp32 does, bar rounding
        metrics = client.get("/metrics").text
        assert 'segment_serving{backend="openvino",device="cpu",model="camvid",precision="int8"} 1.0' in metrics


def test_a_reduced_precision_that_fails_the_street_photo_check_is_refused_and_fp32_serves(shipped, tmp_path,
                                                                                          monkeypatch):
    monkeypatch.setattr(selection, "SANITY", 1.01)  # no reduced precision agrees with fp32 on more than every pixel
    with TestClient(create_app(Settings(checkpoint=shipped, device="cpu", backend="openvino", precision="int8",
                                        cache_dir=tmp_path, warmup_passes=0))) as client:
        info = client.get("/model").json()
        assert (info["backend"], info["precision"]) == ("openvino", "float32")
        assert any(n.startswith("openvino int8 not used (ParityError: its masks agree with torch on")
                   and "pixels of sanity.jpg" in n for n in info["backend_notes"]), info["backend_notes"]
        mask, body = served(client, SANITY_PHOTO.read_bytes())
        assert body["model"]["precision"] == "float32" and mask.size == 480 * 360


def card_json(path) -> dict:
    return json.loads(card_path(path).read_text())


@pytest.mark.parametrize("damage, message", [
    (lambda p: card_path(p).write_text(card_path(p).read_text()[:200]), "is unreadable"),
    (lambda p: card_path(p).write_text(json.dumps({**card_json(p), "format": "something/else"})),
     "is not a precision card"),
    (lambda p: card_path(p).write_text(json.dumps({**card_json(p), "version": 3})), "written by a newer format"),
    (lambda p: card_path(p).write_text(json.dumps({**card_json(p), "judged_on": {"scores": {"fp32": {}}}})),
     "is incomplete"),
    (lambda p: card_path(p).write_text(json.dumps({**card_json(p), "checkpoint_sha256": "0" * 64})),
     "belongs to another checkpoint"),
    (lambda p: card_path(p).unlink(), "no precision card"),
])
def test_a_card_that_does_not_hold_is_refused_with_the_reason(shipped, damage, message):
    damage(shipped)
    with pytest.raises(CardError, match=message):
        read_card(shipped, load_checkpoint(shipped).sha256)


def test_a_changed_or_missing_int8_model_leaves_bf16_and_fp32(shipped):
    sha = load_checkpoint(shipped).sha256
    data = int8_path(shipped).read_bytes()
    int8_path(shipped).write_bytes(data[: len(data) // 2])
    assert read_card(shipped, sha).int8 == {"problem": "its int8 model camvid.int8.onnx changed since the card was "
                                                       "written"}
    int8_path(shipped).unlink()
    card = read_card(shipped, sha)
    assert card.int8 == {"problem": "its int8 model camvid.int8.onnx is missing"} and "fp32" in card.scores


def test_a_broken_card_or_int8_model_means_fp32_and_a_note_never_a_failed_start(shipped, tmp_path):
    int8_path(shipped).write_bytes(b"not an onnx file")
    p = Predictor.load(shipped, "cpu", "int8", "openvino", cache_dir=tmp_path)
    assert p.precision == "float32" and p.backend.name == "openvino"
    assert "int8 not used (its int8 model camvid.int8.onnx changed since the card was written)" in p.backend_notes
    card_path(shipped).write_text("{")
    p = Predictor.load(shipped, "cpu", "auto", "openvino", cache_dir=tmp_path)
    assert p.precision == "float32"
    assert any(n.startswith("precision card: camvid.precision.json is unreadable") for n in p.backend_notes)


def test_auto_stays_fp32_on_a_cpu_without_bf16_or_vnni(shipped, tmp_path, monkeypatch):
    monkeypatch.setattr(precision, "native_precisions", lambda: frozenset())
    p = Predictor.load(shipped, "cpu", "auto", "openvino", cache_dir=tmp_path)
    assert p.precision == "float32"
    notes = " ".join(p.backend_notes)
    assert "bf16 not used (this CPU has no native bf16" in notes and "int8 not used (this CPU has no VNNI" in notes


def test_a_final_model_without_a_twin_serves_no_reduced_precision_under_auto(shipped, tmp_path, monkeypatch):
    # the shipped model trained on every frame of its card's split; without its twin's verdict, auto keeps fp32
    monkeypatch.setattr(precision, "native_precisions", lambda: frozenset({"bf16", "int8"}))
    card = card_json(shipped)
    card.pop("judged_on", None)
    card["held_out"]["trained_on"] = card["held_out"]["images"]
    card_path(shipped).write_text(json.dumps(card))
    p = Predictor.load(shipped, "cpu", "auto", "openvino", cache_dir=tmp_path)
    assert p.precision == "float32"
    for name in ("bf16", "int8"):
        assert any(n.startswith(f"{name} not used (the precision card scored it on 101 of 101 frames it trained on")
                   for n in p.backend_notes), p.backend_notes
    assert any(n.startswith("precision card: mIoU fp32 ") and "101 frames, 101 of them trained on)" in n
               for n in p.backend_notes)


def test_the_shipped_card_is_judged_by_the_held_out_twin_of_its_recipe(shipped):
    card = read_card(shipped, load_checkpoint(shipped).sha256)
    assert card.held_out["trained_on"] == card.held_out["images"] == 101  # a --final fit: valid.txt is training data
    twin = card.judged_on
    assert twin["split"] == "valid: held-out drive 0006R0" and twin["images"] == 101
    assert twin["input_size"] == list(load_checkpoint(shipped).meta.input_size)
    for name in set(twin["scores"]) - {"fp32"}:
        loss = twin["scores"]["fp32"]["mean_iou"] - twin["scores"][name]["mean_iou"]
        assert card.eligible(name)[0] == (loss <= card.tolerance)


@pytest.mark.skipif(not precision.native_precisions(), reason="this CPU has neither native bf16 nor VNNI")
def test_auto_times_the_eligible_reduced_precisions_beside_fp32(shipped, tmp_path):
    p = Predictor.load(shipped, "cpu", "auto", "openvino", cache_dir=tmp_path)
    card = read_card(shipped, load_checkpoint(shipped).sha256)
    eligible = {x for x in precision.native_precisions() if card.eligible(x)[0]}
    if not eligible:  # e.g. int8 alone runs natively here, and the card does not allow it
        assert p.precision == "float32"
        return
    timing = p.backend_notes[-1]
    timed = set(re.findall(r"(\w[\w-]*) [\d.]+ / [\d.]+", timing))
    expected = {"openvino"} | {f"openvino-{'bfloat16' if x == 'bf16' else x}" for x in eligible}
    assert timed == expected, timing
    assert p.precision in {"float32", "bfloat16", "int8"}


@pytest.mark.skipif("int8" not in precision.native_precisions(), reason="this CPU has no VNNI or AMX")
def test_a_model_put_at_run_time_is_served_with_the_card_waiting_for_it_in_the_folder(shipped, tmp_path):
    """PUT /models/NAME checks the upload under a temporary name; its card is the one beside the name it will have
    (NAME.precision.json), so it serves int8 at once, not fp32 until a restart (a reload sees the same sha256)."""
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(card_path(shipped), folder / "street.precision.json")
    shutil.copy(int8_path(shipped), folder / int8_path(shipped).name)  # the file the card names
    settings = Settings(checkpoint=shipped, models_dir=folder, device="cpu", backend="openvino", precision="int8",
                        cache_dir=tmp_path, warmup_passes=0, admin_keys="admin")
    with TestClient(create_app(settings)) as client:
        put = client.put("/models/street", content=shipped.read_bytes(), headers={"X-API-Key": "admin"})
        assert put.status_code == 200 and put.json()["outcome"] == "loaded", put.text
        street = next(m for m in client.get("/models").json()["models"] if m["name"] == "street")
        assert (street["backend"], street["precision"]) == ("openvino", "int8")
        mask, body = served_by(client, "street", SANITY_PHOTO.read_bytes())
        assert body["model"]["precision"] == "int8" and mask.size == 480 * 360


def model_form(checkpoint: Path, card: bytes | None = None, int8: bytes | None = None, **extra) -> dict:
    """PUT /models/NAME's multipart parts: the checkpoint, and its precision card and int8 model when given."""
    files = {"checkpoint": ("x.safetensors", checkpoint.read_bytes())}
    if card is not None:
        files["precision"] = ("x.precision.json", card)
    if int8 is not None:
        files["int8"] = ("x.int8.onnx", int8)
    return {**files, **extra}


@pytest.mark.skipif("int8" not in precision.native_precisions(), reason="this CPU has no VNNI or AMX")
def test_a_model_put_with_its_card_and_int8_model_serves_int8_at_once_and_from_the_folder_after(shipped, tmp_path):
    """One PUT brings the checkpoint, its card and the int8 model the card names (as `quantize` wrote them, under
    the name it quantised): served in int8 at once, and the folder then holds all three under the model's name,
    so the next start serves the same; DELETE takes all three away."""
    folder = tmp_path / "models"
    folder.mkdir()
    settings = Settings(checkpoint=shipped, models_dir=folder, device="cpu", backend="openvino", precision="int8",
                        cache_dir=tmp_path, warmup_passes=0, admin_keys="admin")
    admin = {"X-API-Key": "admin"}
    form = model_form(shipped, card_path(shipped).read_bytes(), int8_path(shipped).read_bytes())
    with TestClient(create_app(settings)) as client:
        put = client.put("/models/street", files=form, headers=admin)
        assert put.status_code == 200, put.text
        assert put.json() | {"sha256": None} == {"name": "street", "outcome": "loaded", "sha256": None,
                                                  "backend": "openvino", "precision": "int8"}
        assert sorted(p.name for p in folder.iterdir()) == ["street.int8.onnx", "street.precision.json",
                                                             "street.safetensors"]
        assert json.loads((folder / "street.precision.json").read_text())["int8"]["file"] == "street.int8.onnx"
        mask, body = served_by(client, "street", SANITY_PHOTO.read_bytes())
        assert body["model"]["precision"] == "int8" and mask.size == 480 * 360
        assert client.post("/models/reload", headers=admin).json()["models"] == {"street": "unchanged"}
    with TestClient(create_app(settings)) as client:  # the next start reads the folder
        street = next(m for m in client.get("/models").json()["models"] if m["name"] == "street")
        assert (street["state"], street["precision"]) == ("ready", "int8")
        assert client.delete("/models/street", headers=admin).status_code == 200
        assert list(folder.iterdir()) == []


def test_a_model_put_with_a_card_that_does_not_hold_is_refused_and_changes_nothing(shipped, tmp_path):
    from tests.service.test_swap import another_model

    folder = tmp_path / "models"
    folder.mkdir()
    settings = Settings(checkpoint=tmp_path / "default.safetensors", models_dir=folder, device="cpu",
                        backend="torch", precision="fp32", warmup_passes=0, admin_keys="admin")
    another_model(shipped, settings.checkpoint)
    admin = {"X-API-Key": "admin"}
    card, int8 = card_path(shipped).read_bytes(), int8_path(shipped).read_bytes()
    refused = {
        "an int8 model serves only with the precision card": model_form(shipped, int8=int8),
        "the precision card names an int8 model (camvid.int8.onnx): send it": model_form(shipped, card),
        "belongs to another checkpoint": model_form(settings.checkpoint, card, int8),
        "changed since the card was written": model_form(shipped, card, int8[:-1] + bytes([int8[-1] ^ 1])),
        "is not a JSON precision card": model_form(shipped, b"\x80 not json", int8),
        "a part named 'weights'": model_form(shipped, weights=("w", b"1")),
        "more than one 'checkpoint' part": [*model_form(shipped).items(), *model_form(shipped).items()],
        "no 'checkpoint' field": {"precision": ("c.json", card)},
        "the 'precision' part passed 1048576 bytes": model_form(shipped, b" " * (2**20 + 1)),
    }
    with TestClient(create_app(settings)) as client:
        for why, form in refused.items():
            r = client.put("/models/street", files=form, headers=admin)
            assert r.status_code in (413, 422) and why in r.json()["detail"], (why, r.text)
        assert list(folder.iterdir()) == []  # no upload left behind
        assert [m["name"] for m in client.get("/models").json()["models"]] == ["default"]
        # a card without an int8 model: held, and served as its checkpoint's card (fp32 here, as asked)
        document = json.loads(card)
        document["int8"] = {}
        put = client.put("/models/street", files=model_form(shipped, json.dumps(document).encode()), headers=admin)
        assert put.status_code == 200 and put.json()["precision"] == "float32", put.text
        assert sorted(p.name for p in folder.iterdir()) == ["street.precision.json", "street.safetensors"]
        held = read_card(folder / "street.safetensors", put.json()["sha256"])
        assert held.int8 == {} and held.scores == document["scores"]


def served_by(client, model: str, data: bytes) -> tuple[np.ndarray, dict]:
    r = client.post(f"/segment?model={model}", files={"image": ("x.jpg", data, "image/jpeg")})
    assert r.status_code == 200, r.text
    return np.array(Image.open(io.BytesIO(base64.b64decode(r.json()["mask"])))), r.json()

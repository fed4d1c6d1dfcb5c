"""Integration tests of `unimiss.readers` through `unimiss-preprocess ct`: DICOM series, MetaImage and NRRD give the same
sub-volumes as NIfTI; bad DICOM series are refused by name; pydicom's bundled test files read as pydicom reads them."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

pytest.importorskip("SimpleITK")

from unimiss.data import phantom_ct
from unimiss.preprocess import preprocess_ct
from unimiss.readers import (LPS_TO_RAS, read_volume, scan_dicom, write_dicom_series)
from unimiss.casedata import read_ct_case

# x runs right-to-left, z from head to feet: flipped on two axes, not oblique
AFFINE = np.array([[-0.75, 0, 0, 30.0], [0, 0.8, 0, -20.0], [0, 0, -1.5, 60.0], [0, 0, 0, 1]])
SHAPE = (40, 36, 30)


def _volume(seed=0):
    "A phantom CT in HU on a 0.5 HU grid (exact after slope 0.5 / intercept -1024 storage)."
    return np.clip(np.rint(phantom_ct(SHAPE, seed) * 2) / 2, -1024, 3000).astype(np.float32)


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "unimiss.preprocess", *map(str, args)], capture_output=True, text=True)


def _outputs(folder):
    "Every sub-volume under `folder`: relative name -> (voxels, affine)."
    return {p.relative_to(folder).as_posix(): (np.asarray(nib.load(p).dataobj), nib.load(p).affine)
            for p in sorted(Path(folder).rglob("*.nii.gz"))}


def _assert_same_outputs(a, b):
    oa, ob = _outputs(a), _outputs(b)
    assert oa.keys() == ob.keys() and len(oa) > 0
    for k in oa:
        np.testing.assert_array_equal(oa[k][0], ob[k][0], err_msg=k)
        np.testing.assert_allclose(oa[k][1], ob[k][1], atol=1e-4, err_msg=k)


def _write_mhd(path, vol, affine):
    "MetaImage written by hand from a RAS affine (LPS in the header), int16 voxels."
    lps = LPS_TO_RAS @ affine
    sp = np.linalg.norm(lps[:3, :3], axis=0)
    dirs = (lps[:3, :3] / sp).T   # row k: direction of voxel axis k
    path.parent.mkdir(parents=True, exist_ok=True)
    path.with_suffix(".raw").write_bytes(vol.transpose(2, 1, 0).astype("<i2").tobytes())
    path.write_text(f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
                    f"TransformMatrix = {' '.join(f'{v:g}' for v in dirs.ravel())}\nOffset = {' '.join(f'{v:g}' for v in lps[:3, 3])}\n"
                    f"ElementSpacing = {' '.join(f'{v:g}' for v in sp)}\nDimSize = {' '.join(map(str, vol.shape))}\n"
                    f"ElementType = MET_SHORT\nElementDataFile = {path.with_suffix('.raw').name}\n")


def _write_nrrd(path, vol, affine):
    "NRRD written by hand in RAS space (ITK converts it to LPS), int16 voxels, attached raw data."
    vec = lambda v: "(" + ",".join(f"{x:g}" for x in v) + ")"
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: right-anterior-superior\nsizes: {' '.join(map(str, vol.shape))}\n"
              f"space directions: {' '.join(vec(affine[:3, k]) for k in range(3))}\nkinds: domain domain domain\n"
              f"endian: little\nencoding: raw\nspace origin: {vec(affine[:3, 3])}\n\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode() + vol.transpose(2, 1, 0).astype("<i2").tobytes())


def test_dicom_mhd_nrrd_give_the_nifti_subvolumes(tmp_path):
    vol = _volume()
    (tmp_path / "nii").mkdir()
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "nii/case.nii.gz")
    files = write_dicom_series(tmp_path / "dcm/case", vol, AFFINE, slope=0.5, intercept=-1024, shuffle=3, patient_id="P1")
    assert [p.name for p in files] != sorted(p.name for p in files)   # file names say nothing about the order
    _write_mhd(tmp_path / "mhd/case.mhd", vol, AFFINE)
    _write_nrrd(tmp_path / "nrrd/case.nrrd", vol, AFFINE)
    for fmt in ("nii", "dcm"):   # the command line for NIfTI and DICOM
        r = _cli("ct", tmp_path / fmt, tmp_path / f"out_{fmt}", "--tile-depth", "8", "--stride", "4", "--no-progress")
        assert r.returncode == 0, r.stderr
    for fmt in ("mhd", "nrrd"):
        preprocess_ct(tmp_path / fmt, tmp_path / f"out_{fmt}", tile_depth=8, stride=4, progress=False)
    for fmt in ("dcm", "mhd", "nrrd"):
        _assert_same_outputs(tmp_path / "out_nii", tmp_path / f"out_{fmt}")
    m = json.loads((tmp_path / "out_dcm/manifest.json").read_text())
    (c,) = m["cases"]
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert c["case"] == "case" and c["dicom"]["series_uid"] == uid and c["dicom"]["patient_id"] == "P1"
    assert c["dicom"]["n_slices"] == SHAPE[2] and c["source_axcodes"] == "LAI" and m["skipped"] == []
    ref = json.loads((tmp_path / "out_nii/manifest.json").read_text())["cases"][0]
    assert c["source_shape"] == ref["source_shape"] and np.allclose(c["source_spacing"], ref["source_spacing"])


def _bad_folder(root):
    "A download folder holding 2 good series side by side in one folder, and 6 bad ones."
    vol = np.random.default_rng(1).integers(-1000, 1000, (16, 12, 10)).astype(np.float32)
    aff = AFFINE.copy()
    write_dicom_series(root / "mixed", vol, aff, prefix="a", series_number=2)   # two series in one folder
    write_dicom_series(root / "mixed", vol[::-1], aff, prefix="b", series_number=3)
    dup = write_dicom_series(root / "dup", vol, aff)
    ds = pydicom.dcmread(dup[4]); ds.ImagePositionPatient = pydicom.dcmread(dup[5]).ImagePositionPatient; ds.save_as(dup[4])
    write_dicom_series(root / "gap", vol, aff)[6].unlink()
    write_dicom_series(root / "mr", vol, aff, modality="MR")
    write_dicom_series(root / "htj2k", vol, aff, transfer_syntax="1.2.840.10008.1.2.4.201")
    tilted = write_dicom_series(root / "tilt", vol, aff)
    for k, p in enumerate(tilted):   # each slice shifted 0.3 mm more along y: a sheared (tilted) stack
        ds = pydicom.dcmread(p); ipp = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.3 * ds.InstanceNumber, ipp[2]]; ds.save_as(p)
    two = write_dicom_series(root / "orient", vol, aff)
    ds = pydicom.dcmread(two[0]); ds.ImageOrientationPatient = [0, 1, 0, 1, 0, 0]; ds.save_as(two[0])
    return {"dup": "duplicated slice position", "gap": "1 missing slice(s)", "mr": "modality MR, expected CT",
            "htj2k": "unsupported transfer syntax High-Throughput JPEG 2000", "tilt": "offset sideways",
            "orient": "several slice orientations"}


def test_bad_series_are_named_counted_and_not_written(tmp_path):
    expected = _bad_folder(tmp_path / "src")
    r = _cli("ct", tmp_path / "src", tmp_path / "out", "--tile-depth", "4", "--no-progress")   # default: refuse
    assert r.returncode != 0 and "5 DICOM series cannot be read" in r.stderr, r.stderr
    assert not (tmp_path / "out/manifest.json").exists() and not list(tmp_path.glob("out/*.nii.gz"))
    r = _cli("ct", tmp_path / "src", tmp_path / "out", "--tile-depth", "4", "--on-error", "skip", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "(0 failed, 6 DICOM series skipped)" in r.stderr
    m = json.loads((tmp_path / "out/manifest.json").read_text())
    assert [c["case"] for c in m["cases"]] == ["mixed_2", "mixed_3"]
    skipped = {Path(s["folder"]).name: s["error"] for s in m["skipped"]}
    assert skipped.keys() == expected.keys()
    for name, why in expected.items():
        assert why in skipped[name] and str(tmp_path / "src" / name) in skipped[name], skipped[name]
        assert name in r.stderr and why in r.stderr
    assert {p.name.split("_dep")[0] for p in (tmp_path / "out").glob("*.nii.gz")} == {"mixed_2", "mixed_3"}
    series, _ = scan_dicom(tmp_path / "src/mixed")   # the two series of one folder, each read whole, not interleaved
    a, b = (np.asarray(read_volume(s).dataobj) for s in series)
    np.testing.assert_array_equal(a, b[::-1])   # the second was written flipped along x


def test_compressed_series_and_labels_matched_by_grid(tmp_path):
    vol = _volume(2)
    write_dicom_series(tmp_path / "rle/P7/ct", vol, AFFINE, transfer_syntax="1.2.840.10008.1.2.5", shuffle=1)
    (s,), problems = scan_dicom(tmp_path / "rle")
    assert problems == [] and s.transfer_syntax.startswith("RLE Lossless")
    img = read_volume(s)
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-5)
    lab = (vol < -500).astype(np.uint8)   # air and lungs
    ras = nib.Nifti1Image(lab, AFFINE).as_reoriented(np.array([[0, -1], [1, 1], [2, -1]]))   # stored RAS, other name
    (tmp_path / "lab").mkdir(); nib.save(ras, tmp_path / "lab/segmentation_007.nii.gz")
    m = preprocess_ct(tmp_path / "rle", tmp_path / "out", labels=tmp_path / "lab", tile_depth=8, progress=False)
    (c,) = m["cases"]
    assert c["case"] == "P7_ct" and c["label"].endswith("segmentation_007.nii.gz")
    (tmp_path / "nii").mkdir(); (tmp_path / "nii_lab").mkdir()   # the NIfTI path, label found by its name
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "nii/P7_ct.nii.gz")
    nib.save(nib.Nifti1Image(lab, AFFINE), tmp_path / "nii_lab/P7_ct.nii.gz")
    preprocess_ct(tmp_path / "nii", tmp_path / "out_nii", labels=tmp_path / "nii_lab", tile_depth=8, progress=False)
    _assert_same_outputs(tmp_path / "out_nii", tmp_path / "out")   # images and labels/
    assert len(c["label_outputs"]) == len(c["outputs"]) > 1
    nib.save(nib.Nifti1Image(lab[:, :, 1:], AFFINE), tmp_path / "lab/P7_ct.nii.gz")   # named for the case, wrong grid
    with pytest.raises(ValueError, match="does not match"):
        preprocess_ct(tmp_path / "rle", tmp_path / "out2", labels=tmp_path / "lab", tile_depth=8, progress=False)


def test_finetuning_case_reader_takes_dicom(tmp_path):
    vol = _volume(3)
    nib.save(nib.Nifti1Image(vol, AFFINE), tmp_path / "c.nii.gz")
    write_dicom_series(tmp_path / "c_dcm", vol, AFFINE, shuffle=0)
    a, _ = read_ct_case(dict(name="c", image=tmp_path / "c.nii.gz", label=1), spacing=(1.5, 1.5, 3))
    b, _ = read_ct_case(dict(name="c", image=tmp_path / "c_dcm", label=1), spacing=(1.5, 1.5, 3))
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                                  "MR_small_bigendian.dcm", "MR_small_implicit.dcm"])
def test_pydicom_test_files_in_every_syntax(name):
    "pydicom ships one MR slice in several transfer syntaxes: each decodes to the uncompressed file's values."
    from pydicom.data import get_testdata_file
    ref = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    img = read_volume(get_testdata_file(name))
    want = ref.pixel_array.T.astype(np.float32) * float(ref.get("RescaleSlope", 1)) + float(ref.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0], want)


def test_pydicom_ct_small_geometry_and_hu():
    "CT_small.dcm: HU from its rescale tags and the affine from its position/orientation, computed independently."
    from pydicom.data import get_testdata_file
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    img = read_volume(path)
    hu = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(np.asarray(img.dataobj)[:, :, 0].T, hu)
    row, col = np.asarray(ds.ImageOrientationPatient[:3], float), np.asarray(ds.ImageOrientationPatient[3:], float)
    ras = np.array([-1, -1, 1])
    # the centre of pixel (row r, column c) is IPP + c * dc * row + r * dr * col (LPS)
    dr, dc = (float(v) for v in ds.PixelSpacing)
    r, c = 7, 11
    want = ras * (np.asarray(ds.ImagePositionPatient, float) + c * dc * row + r * dr * col)
    np.testing.assert_allclose(img.affine[:3] @ [c, r, 0, 1], want, atol=1e-4)
    assert nib.aff2axcodes(img.affine)[:2] == ("L", "P") and img.header.get_zooms()[2] == pytest.approx(float(ds.SliceThickness))


def test_per_slice_rescale_and_detached_nrrd(tmp_path):
    "Each slice's own RescaleIntercept is applied; a detached, gzip-encoded NRRD (.nhdr + .raw.gz, LPS space) reads too."
    import gzip
    vol = np.random.default_rng(4).integers(-1000, 1500, (8, 6, 5)).astype(np.float32)
    files = write_dicom_series(tmp_path / "dcm", vol, AFFINE)
    for p in files[::2]:   # same HU stored with another intercept
        ds = pydicom.dcmread(p)
        ds.PixelData = (ds.pixel_array.astype(np.int16) - 24).tobytes(); ds.RescaleIntercept = "-1000"; ds.save_as(p)
    np.testing.assert_array_equal(np.asarray(read_volume(tmp_path / "dcm").dataobj), vol)
    lps = LPS_TO_RAS @ AFFINE
    vec = lambda v: "(" + ",".join(f"{x:g}" for x in v) + ")"
    (tmp_path / "v.raw.gz").write_bytes(gzip.compress(vol.transpose(2, 1, 0).astype("<i2").tobytes()))
    (tmp_path / "v.nhdr").write_text(
        f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {' '.join(map(str, vol.shape))}\n"
        f"space directions: {' '.join(vec(lps[:3, k]) for k in range(3))}\nkinds: domain domain domain\nendian: little\n"
        f"encoding: gzip\nspace origin: {vec(lps[:3, 3])}\ndata file: v.raw.gz\n")
    img = read_volume(tmp_path / "v.nhdr")
    np.testing.assert_array_equal(np.asarray(img.dataobj), vol)
    np.testing.assert_allclose(img.affine, AFFINE, atol=1e-6)


def test_header_scan_in_worker_processes(tmp_path):
    "The header scan of a large folder runs in worker processes and finds the same series, in the same order."
    vol = np.random.default_rng(5).integers(-1000, 1000, (4, 4, 300)).astype(np.float32)
    write_dicom_series(tmp_path / "s", vol, AFFINE, shuffle=2)
    (a,), _ = scan_dicom(tmp_path, num_workers=2)
    (b,), _ = scan_dicom(tmp_path)
    assert a == b and len(a.files) == 300

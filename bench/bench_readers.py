"""Seconds to read one 512x512xN CT series (synthetic, uncompressed or RLE, shuffled file names) with each candidate reader,
and whether it gives the known voxels and RAS affine.

    python bench/bench_readers.py --slices 300 --rounds 3 [--rle] [--folder /tmp/bench_series]

Candidates: unimiss.readers (pydicom headers + SimpleITK/GDCM pixels), SimpleITK alone (GDCM series sort), pydicom
alone (dcmread + pixel_array, sorted along the normal), MONAI's PydicomReader (LoadImage). MONAI's ITKReader needs the
`itk` package, which is not installed here; it is skipped with a note when absent.
"""
import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import numpy as np


def _known(shape, seed=0):
    rng = np.random.default_rng(seed)
    vol = rng.integers(-1024, 2000, shape).astype(np.float32)
    aff = np.array([[-0.7, 0, 0, 180.0], [0, 0.7, 0, -170.0], [0, 0, -1.25, 50.0], [0, 0, 0, 1]])   # L, A, I
    return vol, aff


def read_unimiss(folder):
    from unimiss.readers import read_dicom_series, scan_dicom
    (s,), _ = scan_dicom(folder)
    img = read_dicom_series(s)
    return np.asarray(img.dataobj), img.affine


def read_sitk(folder):
    import SimpleITK as sitk
    from unimiss.readers import sitk_to_nifti
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(folder)))
    r.SetOutputPixelType(sitk.sitkFloat32)
    img = sitk_to_nifti(r.Execute())
    return np.asarray(img.dataobj), img.affine


def read_pydicom(folder):
    import pydicom
    from unimiss.readers import LPS_TO_RAS
    dss = [pydicom.dcmread(p) for p in sorted(Path(folder).glob("*.dcm"))]
    iop = np.asarray(dss[0].ImageOrientationPatient, float)
    n = np.cross(iop[:3], iop[3:])
    dss.sort(key=lambda ds: float(np.asarray(ds.ImagePositionPatient, float) @ n))
    vol = np.stack([ds.pixel_array.T.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in dss], -1)
    ps = np.asarray(dss[0].PixelSpacing, float)
    p0, p1 = (np.asarray(ds.ImagePositionPatient, float) for ds in dss[:2])
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = iop[:3] * ps[1], iop[3:] * ps[0], p1 - p0, p0
    return vol, LPS_TO_RAS @ lps


def read_monai_pydicom(folder):
    from monai.transforms import LoadImage
    img = LoadImage(reader="PydicomReader", image_only=True)(str(folder))
    return np.asarray(img), np.asarray(img.affine)


def read_monai_itk(folder):
    from monai.transforms import LoadImage
    img = LoadImage(reader="ITKReader", image_only=True)(str(folder))
    return np.asarray(img), np.asarray(img.affine)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=300)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rle", action="store_true", help="RLE-compressed pixel data")
    ap.add_argument("--folder", default="/tmp/bench_series")
    ap.add_argument("--out", help="write the results as JSON here")
    a = ap.parse_args()
    from unimiss.readers import write_dicom_series
    vol, aff = _known((a.size, a.size, a.slices))
    folder = Path(a.folder)
    shutil.rmtree(folder, ignore_errors=True)
    t = time.perf_counter()
    write_dicom_series(folder, vol, aff, shuffle=0, transfer_syntax="1.2.840.10008.1.2.5" if a.rle else "1.2.840.10008.1.2.1")
    print(f"wrote {a.slices} slices of {a.size}x{a.size} in {time.perf_counter() - t:.1f} s")
    readers = dict(unimiss=read_unimiss, simpleitk=read_sitk, pydicom=read_pydicom, monai_pydicom=read_monai_pydicom,
                   monai_itk=read_monai_itk)
    results = {}
    for rnd in range(a.rounds):   # rounds interleave the readers, so the page cache and load treat them alike
        for name, fn in readers.items():
            if results.get(name, {}).get("error"): continue
            try:
                t = time.perf_counter(); arr, affine = fn(folder); dt = time.perf_counter() - t
            except Exception as e:   # a missing package or a reader that cannot handle the series
                results[name] = dict(error=f"{type(e).__name__}: {str(e).strip().splitlines()[0][:160]}"); continue
            r = results.setdefault(name, dict(seconds=[]))
            r["seconds"].append(dt)
            if rnd == 0:
                r["voxels_equal"] = bool(arr.shape == vol.shape and np.array_equal(arr, vol))
                r["shape"] = list(arr.shape)
                r["affine_equal"] = bool(np.allclose(affine, aff, atol=1e-4))
    for name, r in results.items():
        if "seconds" in r: r["median_s"] = statistics.median(r["seconds"])
        print(name, json.dumps(r))
    if a.out: Path(a.out).write_text(json.dumps(dict(args=vars(a), results=results), indent=1))
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()

"Integration tests of unimiss.data: real files on disk, DataLoader workers (fork and spawn), the cache, bad input."
import json
import logging
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unimiss.data import (CT_VIEWS, BadImageError, Dataset2D, Dataset3D, ct_crop_box, list_images,
                          make_phantom_corpus, phantom_ct, phantom_xray, read_image, read_list_file,
                          read_volume, slice_viewer, write_dicom, write_image, write_list_file, write_nifti)

CT_SIZE, XRAY_SIZE = (16, 32, 32), 32  # small views keep the tests fast
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return make_phantom_corpus(tmp_path_factory.mktemp("corpus"), n_ct=4, n_xray=4, ct_shape=(64, 64, 20), xray_size=96)


def make(spatial_dims, source, **kwargs):
    if spatial_dims == 2:
        return Dataset2D(source, img_size=XRAY_SIZE, **kwargs)
    return Dataset3D(source, img_size=CT_SIZE, **kwargs)


def files_of(corpus, spatial_dims):
    return corpus["xray" if spatial_dims == 2 else "ct"]


def bad_files(folder:Path, spatial_dims:int) -> dict:
    "One file per kind of bad input for the modality, keyed by the text its error must contain."
    folder.mkdir(parents=True, exist_ok=True)
    if spatial_dims == 3:
        good = write_nifti(folder / "good.nii.gz", phantom_ct((40, 40, 20)))
        (folder / "truncated.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
        (folder / "corrupt.nii.gz").write_bytes(b"not a nifti file at all" * 20)
        nib.save(nib.Nifti1Image(phantom_ct((40, 40, 1))[..., 0], np.eye(4)), folder / "flat.nii.gz")
        nan = phantom_ct((40, 40, 20)).astype(np.float32)
        nan[1, 2, 3] = np.inf
        write_nifti(folder / "nonfinite.nii.gz", nan)
        write_nifti(folder / "constant.nii.gz", np.zeros((40, 40, 20), np.int16))
        return {"cannot read NIfTI": folder / "truncated.nii.gz", "Not a gzipped file": folder / "corrupt.nii.gz",
                "expected a 3-D volume": folder / "flat.nii.gz", "non-finite": folder / "nonfinite.nii.gz",
                "constant image": folder / "constant.nii.gz", "does not exist": folder / "missing.nii.gz"}
    good = write_image(folder / "good.png", phantom_xray(64))
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff" + b"garbage" * 50)
    write_dicom(folder / "rgb.dcm", phantom_xray(32))
    import pydicom
    ds = pydicom.dcmread(folder / "rgb.dcm")
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.PixelData = ds.PixelData * 3
    ds.save_as(folder / "rgb.dcm")
    write_image(folder / "constant.png", np.full((64, 64), 0.5))
    return {"image file is truncated": folder / "truncated.png", "cannot decode image": folder / "corrupt.jpg",
            "single-frame grayscale": folder / "rgb.dcm", "constant image": folder / "constant.png",
            "does not exist": folder / "missing.png"}


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bad_files_raise_naming_the_file(tmp_path, spatial_dims):
    read = read_image if spatial_dims == 2 else read_volume
    for reason, path in bad_files(tmp_path, spatial_dims).items():
        with pytest.raises((BadImageError, FileNotFoundError)) as info:
            read(path)
        assert path.name in str(info.value) and reason in str(info.value), str(info.value)
        if path.exists():  # the dataset raises the same error when the file is sampled
            ds = make(spatial_dims, [tmp_path / ("good.png" if spatial_dims == 2 else "good.nii.gz"), path])
            ds[0]
            with pytest.raises(BadImageError, match=reason):
                ds[1]


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_skip_mode_counts_over_workers(tmp_path, spatial_dims, caplog):
    bad = bad_files(tmp_path, spatial_dims)
    good = tmp_path / ("good.png" if spatial_dims == 2 else "good.nii.gz")
    with caplog.at_level(logging.WARNING, logger="unimiss.data"):
        ds = make(spatial_dims, [good, *bad.values()], on_error="skip", seed=0)
    assert len(ds) == len(bad) and ds.skipped == 1  # the missing file is dropped when building
    assert "missing" in caplog.text
    views = [v for batch in DataLoader(ds, batch_size=2, num_workers=2) for v in batch]
    assert len(views) == 2 * ((len(ds) + 1) // 2) and all(torch.isfinite(v).all() for v in views)
    # every bad file drawn is counted; each of the len(bad) - 1 bad items needed at least one replacement
    assert ds.skipped >= len(bad)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unimiss.data"):
        assert ds.report_skipped() == ds.skipped
    assert f"skipped {ds.skipped} unusable file(s)" in caplog.text


def test_skip_mode_gives_up_when_nothing_is_readable(tmp_path):
    bad = bad_files(tmp_path, 3)
    ds = Dataset3D([bad["constant image"], bad["non-finite"]], img_size=CT_SIZE, on_error="skip")
    with pytest.raises(RuntimeError, match="unusable files in a row"):
        ds[0]


def test_empty_and_missing_sources(tmp_path):
    with pytest.raises(ValueError, match="no 2D images in folder"):
        Dataset2D(tmp_path)
    with pytest.raises(ValueError, match="no 3D images in list file"):
        Dataset3D(write_list_file(tmp_path / "empty.txt", []))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dataset3D(tmp_path / "nowhere.txt")
    with pytest.raises(FileNotFoundError, match="2 of 2 image files do not exist"):
        Dataset2D([tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(ValueError, match="on_error"):
        Dataset2D(tmp_path, on_error="ignore")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_seeded_items_do_not_depend_on_workers(corpus, spatial_dims):
    ds = make(spatial_dims, files_of(corpus, spatial_dims), seed=11)
    direct = [ds[i] for i in range(len(ds))]
    loaded = list(DataLoader(ds, batch_size=1, num_workers=2))
    for item, batch in zip(direct, loaded):
        for view, batched in zip(item, batch):
            torch.testing.assert_close(view, batched[0], rtol=0, atol=0)


def test_spawned_workers_share_epoch_and_skip_counts(corpus, tmp_path):
    "With the 'spawn' start method (macOS, Windows) the dataset is pickled; its counters must stay shared."
    bad = bad_files(tmp_path, 3)["constant image"]
    ds = Dataset3D([corpus["ct"][0], bad], img_size=CT_SIZE, on_error="skip", seed=2)
    ds.set_epoch(4)
    direct = ds[0]
    loaded = list(DataLoader(ds, batch_size=1, num_workers=1, multiprocessing_context="spawn"))
    torch.testing.assert_close(loaded[0][0][0], direct[0], rtol=0, atol=0)  # the worker saw epoch 4
    assert ds.skipped >= 1  # the replacement of item 1 happened in the worker


def test_set_epoch_reaches_persistent_workers(corpus):
    ds = Dataset3D(corpus["ct"][:2], img_size=CT_SIZE, seed=3)
    loader = DataLoader(ds, batch_size=2, num_workers=1, persistent_workers=True)
    first = next(iter(loader))
    ds.set_epoch(1)
    second = next(iter(loader))
    assert not torch.equal(first[0], second[0])
    ds.set_epoch(0)
    torch.testing.assert_close(next(iter(loader))[0], first[0], rtol=0, atol=0)


def test_unseeded_runs_repeat_under_torch_manual_seed(corpus):
    ds = Dataset2D(corpus["xray"], img_size=XRAY_SIZE)
    def run():
        torch.manual_seed(0)
        return [v for batch in DataLoader(ds, batch_size=2, num_workers=2) for v in batch]
    a, b = run(), run()
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(ds[0][0], ds[0][0])  # but views change from call to call


def test_cache_gives_identical_views_and_is_built_once(corpus, tmp_path):
    plain = Dataset3D(corpus["ct_list"], img_size=CT_SIZE, seed=5)
    cached = Dataset3D(corpus["ct_list"], img_size=CT_SIZE, seed=5, cache_dir=tmp_path / "cache")
    for i in range(len(plain)):  # first pass fills the cache lazily, second reads it
        for _ in range(2):
            for a, b in zip(plain[i], cached[i]):
                torch.testing.assert_close(a, b, rtol=0, atol=0)
    entries = sorted((tmp_path / "cache").glob("*.npy"))
    assert len(entries) == len(plain)
    assert cached.build_cache(progress=False) == len(plain)
    assert sorted((tmp_path / "cache").glob("*")) == entries  # nothing rewritten, no temporary files left
    assert np.load(entries[0], mmap_mode="r").dtype == np.int16


def test_cache_filled_concurrently_by_workers(corpus, tmp_path):
    ds = Dataset3D(corpus["ct"] * 3, img_size=CT_SIZE, cache_dir=tmp_path / "cache")
    batches = list(DataLoader(ds, batch_size=1, num_workers=2))
    assert len(batches) == 3 * len(corpus["ct"])
    assert len(list((tmp_path / "cache").iterdir())) == len(corpus["ct"])


def test_ct_views_small_volume_window_and_padding(tmp_path):
    f = write_nifti(tmp_path / "thin.nii.gz", phantom_ct((40, 30, 6)))
    ds = Dataset3D([f], img_size=(16, 96, 96), hu_window=(-1000, 400), pad_hu=-1024, seed=0)
    base = ds.base_crop(f, np.random.default_rng(0))
    assert base.shape[0] == 16 and 134 <= base.shape[1] <= 172 and 134 <= base.shape[2] <= 172
    assert base.min() >= -1024 / 1024 and base.max() <= 400 / 1024
    views = ds[0]
    assert [tuple(v.shape) for v in views] == [(1, 16, 96, 96)] * 2
    assert len(CT_VIEWS) == 2


def test_official_crop_sizes():
    rng = np.random.default_rng(0)
    base = np.array([ct_crop_box((24, 256, 256), (24, 96, 96), (1.4, 1.8), rng)[1] for _ in range(500)])
    assert (base[:, 0] == 24).all() and base[:, 1:].min() >= 134 and base[:, 1:].max() <= 172
    view = np.array([ct_crop_box((24, 150, 150), (16, 96, 96), (0.8, 1.2), rng)[1] for _ in range(500)])
    assert (view[:, 0] == 16).all() and view[:, 1:].min() >= 76 and view[:, 1:].max() <= 115


def test_list_files_roundtrip_with_root(tmp_path, corpus):
    listing = write_list_file(tmp_path / "lists" / "ct.txt", corpus["ct"], root=Path(corpus["ct"][0]).parents[1])
    assert read_list_file(listing).__len__() == len(corpus["ct"])
    assert read_list_file(listing, root=Path(corpus["ct"][0]).parents[1]) == corpus["ct"]
    assert list_images(listing, 3, root=Path(corpus["ct"][0]).parents[1]) == corpus["ct"]
    with pytest.raises(ValueError, match="whitespace"):
        write_list_file(tmp_path / "x.txt", [tmp_path / "a b.png"])


def test_dicom_monochrome1_and_16bit_png(tmp_path):
    img = phantom_xray(48, seed=4)
    mono1 = read_image(write_dicom(tmp_path / "m1.dcm", img, bits=15, monochrome1=True, intercept=-1024))
    png16 = read_image(write_image(tmp_path / "x16.png", img, bits=16))
    expected = (img - img.min()) / (img.max() - img.min())  # both are min-max scaled
    np.testing.assert_allclose(mono1, expected, atol=1e-3)
    np.testing.assert_allclose(png16, expected, atol=1e-4)


def test_slice_viewer_builds_a_widget():
    vol = np.random.default_rng(0).normal(size=(6, 16, 16)).astype(np.float32)
    widget = slice_viewer(torch.from_numpy(vol)[None], labels=(vol > 1).astype(int), axis=1)
    assert widget.children[0].max == 15
    with pytest.raises(ValueError, match="labels shape"):
        slice_viewer(vol, labels=np.zeros((6, 16, 15)))


def test_bench_script_prints_json(tmp_path):
    "bench_data.py against a stand-in for the official loaders (same constructors, same view shapes): ratios in one run."
    fake = tmp_path / "UniMiSS"
    fake.mkdir()
    for dims, shape in ((3, "(1, 16, 96, 96)"), (2, "(3, 224, 224)")):
        (fake / f"data_loader{dims}D.py").write_text(
            "import torch\n"
            f"class Dataset{dims}D:\n"
            f"    def __init__(self, root, list_path, crop_size_{dims}D=None):\n"
            "        self.n = len(open(root + list_path).read().split())\n"
            "    def __len__(self): return self.n\n"
            "    def __getitem__(self, i):\n"
            "        sum(range(300_000))  # some CPU work, so that the ratios are finite\n"
            f"        return [torch.zeros{shape}, torch.zeros{shape}]\n")
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_data.py"), "--n", "2", "--rounds", "2", "--json",
                          "--official", str(fake), "--out", str(tmp_path / "r.jsonl")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "r.jsonl").read_text()) == result
    for key in ("ours3d_wall", "ours3d_cached_cpu", "ours2d_cpu", "official3d_cpu", "speedup_ours3d_cpu",
                "speedup_ours3d_cached_wall", "speedup_ours2d_cpu", "cache_first_epoch_s"):
        assert result[key] > 0, key
    assert result["workers_per_gpu_ours3d"] == -(-216 // result["ours3d_cpu"])
    assert set(result["ours3d_stages_cpu"]) == {"decode_ms", "decode_and_base_crop_ms", "cached_base_crop_ms", "two_views_ms"}
    bad = subprocess.run([sys.executable, str(REPO / "bench" / "bench_data.py"), "--official", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "data_loader3D.py not found" in bad.stderr

"""DRR rendering (unimiss.drr): known line integrals of phantoms, and the `drr` command (resumable, manifest, errors)."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("diffdrr")
from unimiss.data import phantom_ct, write_nifti  # noqa: E402
from unimiss.drr import project, subvolume_drr  # noqa: E402


def test_cone_beam_slab_line_integral():
    "A uniform slab of thickness t along the beam: every ray crosses t / cos(theta) mm (cos = SDD / |ray|)."
    slab = torch.zeros(60, 40, 30)
    slab[:, :, 10:20] = 0.5                      # 10 slices of 1.5 mm = 15 mm of value 0.5 along z
    img = project(slab, (2.0, 3.0, 1.5), axis=2, sdd=1000.0, sod=900.0, detector=(12, 8), pitch=(8.0, 10.0))
    assert img.shape == (8, 12)                  # display orientation: rows = y, columns = x (both reversed)
    u = (torch.arange(12) - 5.5) * 8.0
    v = (torch.arange(8) - 3.5) * 10.0
    cos = 1000.0 / torch.sqrt(1000.0 ** 2 + u[None, :] ** 2 + v[:, None] ** 2)
    np.testing.assert_allclose(img.numpy(), (0.5 * 15.0 / cos).numpy(), rtol=1e-4)


def test_cone_beam_magnification():
    "A 20 mm cube at the isocentre casts a 20·SDD/SOD mm shadow; its central ray crosses 20 mm."
    cube = torch.zeros(40, 40, 40)
    cube[10:30, 10:30, 10:30] = 1.0
    img = project(cube, (1.0, 1.0, 1.0), axis=0, sdd=2000.0, sod=1000.0, detector=100, pitch=1.0)
    torch.testing.assert_close(img[49:51, 49:51], torch.full((2, 2), 20.0), atol=1e-3, rtol=0)
    width = int((img[50] > 0).sum())
    assert abs(width - 40) <= 1                  # 20 mm x 2 = 40 detector pixels of 1 mm


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_parallel_beam_total(axis):
    "Parallel rays: the image integrates to the volume's integral (mm³), along any axis, anisotropic voxels."
    vol = torch.rand(20, 16, 12)
    sp = (1.0, 2.0, 3.0)
    img = project(vol, sp, axis=axis, geometry="parallel", pitch=1.0)
    torch.testing.assert_close(img.sum().double(), vol.sum().double() * 6.0, rtol=2e-4, atol=0)


def test_subvolume_drr_official_steps():
    "Min-max normalised, empty border trimmed, short side 224, values in [0, 1]; constant volumes are refused."
    hu = np.full((40, 40, 12), -1000.0, np.float32)
    hu[10:30, 5:35] = 0.0                       # a block of water in air, narrower than the field
    hu[12:16, 8:12] = 1000.0                    # and a bone insert
    img = subvolume_drr(hu, (2.0, 2.0, 3.0), axis=2, geometry="parallel")
    assert img.shape == (336, 224)              # 30 x 20 voxels of 2 mm (rows: y, columns: x), short side to 224
    assert img.min() == 0.0 and img.max() == 1.0
    cone = subvolume_drr(hu, (2.0, 2.0, 3.0), axis=2, detector=64, pitch=3.0)
    assert cone.shape[1] == 224 and abs(cone.shape[0] / 224 - 1.5) < 0.1   # the magnified shadow, trimmed
    with pytest.raises(ValueError, match="constant"):
        subvolume_drr(np.ones((8, 8, 8)), (1, 1, 1))


def run(*args):
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True)


def test_drr_command(tmp_path):
    for k in range(2):
        write_nifti(tmp_path / "c" / f"s{k}.nii.gz", phantom_ct((32, 32, 8), seed=k), spacing=(4.0, 4.0, 4.0))
    r = run("unimiss.preprocess", "drr", str(tmp_path), "--geometry", "parallel", "--no-progress")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "drr_manifest.json").read_text())
    assert [it["drr"] for it in m["items"]] == ["c/s0.png", "c/s1.png"] and m["params"]["geometry"] == "parallel"
    png = tmp_path / "c" / "s0.png"
    assert min(Image.open(png).size) == 224
    t = png.stat().st_mtime_ns
    (tmp_path / "c" / "s1.png").unlink()                       # an interrupted run: one DRR missing
    r = run("unimiss.drr", str(tmp_path), "--geometry", "parallel", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert png.stat().st_mtime_ns == t and (tmp_path / "c" / "s1.png").is_file()
    r = run("unimiss.drr", str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stderr.strip().count("\n") == 0 and "not a folder" in r.stderr

"""The fast paths of unimiss.data give what the plain formulas give: the banded-matrix blur, the in-place CT intensity
augmentation (gamma as exp/log, stats of the rescaled image taken from the unscaled one), and gzip decoding with
and without python-isal. Each reference below is the straightforward version of the step, consuming the random
generator in the same order, so the same seed must give the same views to float32 rounding."""
import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import unimiss.data as data
from unimiss.data import CT_VIEWS, CTView, augment_ct, augment_ct_intensity, blur_channels, phantom_ct, write_nifti


def conv_blur(x, sigma, radius=None, truncate=4.0):
    "Reference: reflect-pad and convolve each axis with a per-channel Gaussian (torchvision's GaussianBlur, per channel)."
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)
    radius = int(truncate * float(sigma.max()) + 0.5) if radius is None else radius
    if radius < 1:
        return x
    k = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / sigma.clamp_min(1e-6)[:, None]) ** 2)
    nd, c, y = x.ndim - 1, x.shape[0], x[None].double()
    for axis in range(nd):
        r = min(radius, x.shape[1 + axis] - 1)
        if r < 1:
            continue
        kk = k[:, radius - r: radius + r + 1].double()
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = r
        w = (kk / kk.sum(1, keepdim=True)).reshape(c, 1, *[2 * r + 1 if a == axis else 1 for a in range(nd)])
        y = (F.conv1d, F.conv2d, F.conv3d)[nd - 1](F.pad(y, pad, mode="reflect"), w, groups=c)
    return y[0].float()


def reference_intensity(x, view, rng):
    "Reference: the intensity steps as plain out-of-place formulas (pow, stats recomputed on the rescaled image)."
    c = x.shape[0]
    per_slice = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float32)).reshape(c, *[1] * (x.ndim - 1))
    def stats(v):
        flat = v.reshape(c, -1).double()
        shape = (c, *[1] * (v.ndim - 1))
        return [s.reshape(shape).float() for s in (flat.mean(1), flat.std(1, correction=0), flat.amin(1), flat.amax(1))]
    noise = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    sigma = rng.uniform(*view.noise_std) * np.sqrt(c)
    x = x + torch.randn(x.shape, generator=noise) * float(sigma)
    if rng.random() < view.p_blur:
        on = rng.random(c) <= view.p_blur_slice
        if on.any():
            x = conv_blur(x, np.where(on, rng.uniform(*view.blur_sigma, c), 0.0))
    if rng.random() < view.p_mult:
        x = x * per_slice(rng.uniform(*view.mult_range, c))
    if rng.random() < view.p_add:
        x = x + per_slice((rng.random(c) <= view.p_add_slice) * rng.normal(0.0, view.add_std, c))
    mean, _, lo, hi = stats(x)
    x = torch.minimum(torch.maximum((x - mean) * per_slice(data._split_uniform(rng, *view.contrast_range, c)) + mean, lo), hi)
    if rng.random() < view.p_gamma:
        mean, std, lo, hi = stats(x)
        span = hi - lo + 1e-7
        x = ((x - lo) / span).pow(per_slice(data._split_uniform(rng, *view.gamma_range, c))) * span + lo
        new_mean, new_std, _, _ = stats(x)
        x = (x - new_mean) / (new_std + 1e-8) * std + mean
    return x


@pytest.mark.parametrize("shape", [(4, 50), (16, 96, 96), (3, 17, 40), (2, 5, 12, 9), (2, 1, 30)])
def test_blur_matches_padded_convolution(shape):
    rng = np.random.default_rng(len(shape))
    x = torch.randn(shape)
    for sigma in (rng.uniform(0.1, 2.0, shape[0]), np.where(rng.random(shape[0]) < 0.5, 0.0, 3.0), np.full(shape[0], 0.05)):
        torch.testing.assert_close(blur_channels(x, sigma), conv_blur(x, sigma), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(blur_channels(x, np.ones(shape[0]), radius=11), conv_blur(x, np.ones(shape[0]), radius=11),
                               atol=2e-6, rtol=1e-5)


def test_blur_small_sigma_has_no_denormal_taps():
    "σ = 0.1 gives kernel taps around 1e-44 (denormal floats, 10× slower products): they are dropped, values unchanged."
    x = torch.rand(2, 20, 20)
    out = blur_channels(x, [0.1, 2.0])
    torch.testing.assert_close(out[0], x[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(out, conv_blur(x, [0.1, 2.0]), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("view", [*CT_VIEWS, CTView(p_blur=1.0, p_mult=1.0, p_add=1.0, p_gamma=1.0, gamma_range=(0.5, 2.0))])
def test_ct_intensity_matches_reference(seed, view):
    base = torch.from_numpy(phantom_ct((96, 96, 16), seed=seed).transpose(2, 0, 1) / np.float32(1024))
    ours, ref = (f(base.clone(), view, np.random.default_rng(seed)) for f in (augment_ct_intensity, reference_intensity))
    scale = float(ref.abs().max())
    torch.testing.assert_close(ours, ref, atol=2e-5 * scale, rtol=1e-4)


def test_ct_views_do_not_modify_the_base_crop():
    base = torch.randn(24, 150, 150)
    before = base.clone()
    rng = np.random.default_rng(0)
    for view in CT_VIEWS:
        for _ in range(5):  # some draws keep the in-plane size: the view starts as a slice of `base`
            augment_ct(base, CTView(scale=(1.0, 1.0), p_flip=0.0), (16, 96, 96), rng)
            augment_ct(base, view, (16, 96, 96), rng)
    assert torch.equal(base, before)


def test_gzip_fallback_without_isal(tmp_path, monkeypatch):
    "Without python-isal the standard gzip module decodes the same arrays and raises the same errors."
    good = write_nifti(tmp_path / "ct.nii.gz", phantom_ct((40, 36, 20)))
    (tmp_path / "truncated.nii.gz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (tmp_path / "corrupt.nii.gz").write_bytes(b"not a gzip stream" * 10)
    def read_all():
        out = {"good": data.open_volume(good)[0].copy()}
        for name in ("truncated", "corrupt"):
            with pytest.raises(data.BadImageError) as e:
                data.open_volume(tmp_path / f"{name}.nii.gz")
            out[name] = str(e.value).split("(")[1].split(":")[0]  # the decoder's exception type
        return out
    fast = read_all()
    monkeypatch.setattr(data, "_gzip", gzip)
    plain = read_all()
    np.testing.assert_array_equal(fast.pop("good"), plain.pop("good"))
    assert fast == plain == {"truncated": "EOFError", "corrupt": "BadGzipFile"}


def test_gzip_nifti_reader_agrees_with_nibabel(tmp_path):
    "The one-call reader (header by nibabel, voxels a view of the decoded bytes) against `nib.load` on NIfTI variants."
    import nibabel as nib
    vol = phantom_ct((20, 18, 6), seed=3)
    variants = {"nifti1": nib.Nifti1Image(vol, np.eye(4)), "nifti2": nib.Nifti2Image(vol, np.eye(4)),
                "float_big_endian": nib.Nifti1Image(vol.astype(">f4"), np.eye(4)),
                "4d_single": nib.Nifti1Image(vol[..., None], np.eye(4))}
    scaled = nib.Nifti1Image(vol, np.eye(4))
    scaled.header.set_slope_inter(0.5, -3.0)
    scaled.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"an extension shifts the voxel offset"))
    variants["scaled_with_extension"] = scaled
    for name, img in variants.items():
        nib.save(img, tmp_path / f"{name}.nii.gz")
        ref = nib.load(tmp_path / f"{name}.nii.gz")
        raw, slope, inter = data.open_volume(tmp_path / f"{name}.nii.gz")
        np.testing.assert_array_equal(raw, np.asanyarray(ref.dataobj.get_unscaled()).reshape(vol.shape).transpose(2, 0, 1))
        assert (slope, inter) == (float(ref.dataobj.slope), float(ref.dataobj.inter)), name
    header_and_some_voxels = gzip.decompress((tmp_path / "nifti1.nii.gz").read_bytes())[:600]
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(header_and_some_voxels))  # a valid gzip of a cut NIfTI
    with pytest.raises(data.BadImageError, match="short.nii.gz: cannot read NIfTI volume"):
        data.open_volume(tmp_path / "short.nii.gz")


def test_base_crop_one_pass_path_is_exact(tmp_path):
    "The one-pass base crop (integers, no scaling, no window, no padding) gives the bits of the general path."
    f = write_nifti(tmp_path / "ct.nii.gz", phantom_ct((200, 180, 20), seed=1))
    for cache in (None, tmp_path / "cache"):
        fast = data.Dataset3D([f], seed=0, cache_dir=cache)
        general = data.Dataset3D([f], seed=0, cache_dir=cache, hu_window=(-1e9, 1e9))  # a window that clips nothing
        for seed in range(3):
            a, b = (ds.base_crop(f, np.random.default_rng(seed)) for ds in (fast, general))
            assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)

"""Bad inputs and faults through the public entry points (issue 11), one table: readers, preprocessing, datasets,
pretraining, checkpoints and the command lines. Every case states its exact outcome: a named exception whose message
holds the file or parameter, or the correct value.

`python tests/test_bad_inputs.py` runs the table outside pytest and counts the outcomes
(correct / named error / silent / crash / data loss), e.g. against another checkout with `PYTHONPATH=/other/checkout`."""
from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CASES = []  # (area, name, kind, function of a tmp folder); kind: 'error', 'value' or 'loss' (a failure loses data)


class Silent(AssertionError):
    "No error where one was due, or a wrong value."


class Crash(AssertionError):
    "An error, but not the named one: another type, or a message that does not say which file or parameter."


def case(area:str, kind:str='error'):
    def register(fn):
        CASES.append((area, fn.__name__.removeprefix('case_'), kind, fn))
        return fn
    return register


@contextlib.contextmanager
def raises(exc, *needles):
    "The block must raise `exc` with every needle in its message."
    try: yield
    except exc as e:
        missing = [n for n in needles if str(n) not in str(e)]
        if missing: raise Crash(f"{type(e).__name__} does not name {missing}: {e}") from e
    except Exception as e:
        raise Crash(f"expected {exc.__name__}, got {type(e).__name__}: {e}") from e
    else: raise Silent(f"no {exc.__name__} raised")


@contextlib.contextmanager
def logged(level=logging.WARNING):
    "Collect the log messages of `unimiss` at `level` or above."
    msgs, h = [], logging.Handler(level)
    h.emit = lambda r: msgs.append(r.getMessage())
    lg = logging.getLogger('unimiss'); lg.addHandler(h)
    old = lg.level; lg.setLevel(min(level, old or level))
    try: yield msgs
    finally: lg.removeHandler(h); lg.setLevel(old)


def cli(module:str, *args) -> subprocess.CompletedProcess:
    "`unimiss.<module>.main(args)` in this process (a subprocess per case costs seconds of imports): its exit status and output."
    import importlib, io, traceback
    main = importlib.import_module(f'unimiss.{module}').main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main(list(map(str, args)))
        except SystemExit as e: rc = e.code
        except BaseException: traceback.print_exc(file=err); rc = 1
    rc = rc if isinstance(rc, int) else 1  # what `sys.exit` makes of a returned object
    return subprocess.CompletedProcess(args, rc, out.getvalue(), err.getvalue())


def cli_error(r:subprocess.CompletedProcess, *needles):
    "A failed command: non-zero exit, no traceback, and its last stderr line names every needle."
    if r.returncode == 0: raise Silent(f"exit status 0; stderr: {r.stderr[-500:]}")
    if 'Traceback' in r.stderr: raise Crash(f"traceback printed: {r.stderr[-800:]}")
    last = [l for l in r.stderr.splitlines() if l.strip()][-1:] or ['']
    missing = [n for n in needles if str(n) not in last[0]]
    if missing: raise Crash(f"last stderr line does not name {missing}: {last[0]}")


def _arg(v) -> str:
    "A value as a user types it on the command line: strings bare, everything else as JSON."
    return v if isinstance(v, str) else json.dumps(v)

def check(ok:bool, msg:str):
    if not ok: raise Silent(msg)


# ---------------------------------------------------------------- inputs
def phantom_nifti(path, shape=(40, 40, 20), seed=0, dtype=None, spacing=(1., 1., 3.)):
    from unimiss.data import phantom_ct
    arr = phantom_ct(shape, seed)
    if dtype is not None: arr = arr.astype(dtype)
    path = Path(path); path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([*spacing, 1.])), path)
    return path


def xray_png(path, size=48, seed=0, bits=8):
    from unimiss.data import phantom_xray, write_image
    return write_image(path, phantom_xray(size, seed), bits=bits)


def replace_same_size(path, new_bytes):
    "Overwrite `path` with bytes of the same length and put its mtime back (what a careless copy does)."
    st = os.stat(path)
    assert len(new_bytes) == st.st_size
    Path(path).write_bytes(new_bytes)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


# ================================================================ readers
@case('readers')
def case_scl_slope_overflows_float32(tmp):
    from unimiss.data import BadImageError, read_volume
    import struct
    data = bytearray(nib.Nifti1Image(np.arange(256, dtype=np.int16).reshape(8, 8, 4) + 1000, np.eye(4)).to_bytes())
    data[112:120] = struct.pack('<ff', 1e38, 0.)  # scl_slope, scl_inter of the NIfTI-1 header
    (tmp/'slope.nii').write_bytes(bytes(data))
    with raises(BadImageError, 'slope.nii', 'finite'): read_volume(tmp/'slope.nii')

@case('readers')
def case_voxel_1e300_overflows_float32(tmp):
    from unimiss.data import BadImageError, read_volume
    arr = np.random.default_rng(0).normal(size=(8, 8, 4)); arr[1, 1, 1] = 1e300
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp/'big.nii')
    with raises(BadImageError, 'big.nii', 'finite'): read_volume(tmp/'big.nii')

@case('readers')
def case_dataset_crop_with_1e300_voxel(tmp):
    from unimiss.data import BadImageError, Dataset3D
    arr = np.random.default_rng(0).normal(size=(40, 40, 20)) * 100; arr[:, :, :] += 1e300 * (np.arange(40) == 20)[:, None, None]
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp/'big3d.nii')
    with raises(BadImageError, 'big3d.nii', 'finite'): Dataset3D([tmp/'big3d.nii'], img_size=(16, 32, 32), pad_to=(16, 40, 40), seed=0)[0]

@case('readers')
def case_nan_voxel(tmp):
    from unimiss.data import BadImageError, read_volume
    arr = np.ones((8, 8, 4), np.float32); arr[2, 2, 2] = np.nan; arr[0] = 2
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp/'nan.nii.gz')
    with raises(BadImageError, 'nan.nii.gz', 'non-finite'): read_volume(tmp/'nan.nii.gz')

@case('readers')
def case_4d_volume(tmp):
    from unimiss.data import BadImageError, read_volume
    nib.save(nib.Nifti1Image(np.random.rand(8, 8, 4, 2).astype(np.float32), np.eye(4)), tmp/'4d.nii.gz')
    with raises(BadImageError, '4d.nii.gz', '3-D'): read_volume(tmp/'4d.nii.gz')

@case('readers')
def case_constant_volume(tmp):
    from unimiss.data import BadImageError, read_volume
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4)), tmp/'zero.nii.gz')
    with raises(BadImageError, 'zero.nii.gz', 'constant'): read_volume(tmp/'zero.nii.gz')

@case('readers')
def case_truncated_volume(tmp):
    from unimiss.data import BadImageError, read_volume
    good = phantom_nifti(tmp/'g.nii.gz')
    (tmp/'cut.nii.gz').write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with raises(BadImageError, 'cut.nii.gz'): read_volume(tmp/'cut.nii.gz')

@case('readers')
def case_missing_volume(tmp):
    from unimiss.data import read_volume
    with raises(FileNotFoundError, 'gone.nii.gz'): read_volume(tmp/'gone.nii.gz')

@case('readers')
def case_truncated_png(tmp):
    from unimiss.data import BadImageError, read_image
    good = xray_png(tmp/'g.png')
    (tmp/'cut.png').write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    with raises(BadImageError, 'cut.png'): read_image(tmp/'cut.png')

@case('readers', 'value')
def case_png_8_and_16_bit_agree(tmp):
    from unimiss.data import phantom_xray, read_image, write_image
    x = 0.2 + 0.6 * phantom_xray(48)  # a picture that does not span the whole range
    a, b = read_image(write_image(tmp/'a8.png', x, bits=8)), read_image(write_image(tmp/'a16.png', x, bits=16))
    check(np.abs(a - b).max() <= 0.5 / 255 + 1e-6, f"8- and 16-bit versions differ by {np.abs(a - b).max():.4f}")

@case('readers', 'value')
def case_16_bit_png_with_one_bright_pixel(tmp):
    from unimiss.data import read_image
    img = (np.linspace(0, 1, 48 * 48).reshape(48, 48) * 100).round().astype(np.uint8)  # a dim 8-bit picture
    img16 = img.astype(np.uint16) * 257
    img[0, 0], img16[0, 0] = 255, 65535
    Image.fromarray(img).save(tmp/'dim8.png'); Image.fromarray(img16).save(tmp/'dim16.png')
    a, b = read_image(tmp/'dim8.png'), read_image(tmp/'dim16.png')
    check(abs(a.mean() - b.mean()) < 1e-4, f"one bright pixel: 8-bit mean {a.mean():.4f}, 16-bit mean {b.mean():.4f}")

@case('readers', 'value')
def case_cmyk_jpeg(tmp):
    from unimiss.data import phantom_xray, read_image
    x = phantom_xray(64, 1)
    Image.fromarray((x * 255).round().astype(np.uint8)).convert('RGB').convert('CMYK').save(tmp/'c.jpg', quality=95)
    err = np.abs(read_image(tmp/'c.jpg') - x).max()
    check(err < 0.05, f"CMYK JPEG decodes with max error {err:.3f}")

@case('readers', 'value')
def case_list_file_crlf(tmp):
    from unimiss.data import read_list_file
    (tmp/'l.txt').write_bytes(b'a/x.png\r\nb/y.png\r\n')
    check(read_list_file(tmp/'l.txt') == [tmp/'a/x.png', tmp/'b/y.png'], f"{read_list_file(tmp/'l.txt')}")

@case('readers', 'value')
def case_list_file_backslashes(tmp):
    from unimiss.data import read_list_file
    (tmp/'l.txt').write_text('a\\x.png\nb\\c\\y.png\n')
    check(read_list_file(tmp/'l.txt') == [tmp/'a/x.png', tmp/'b/c/y.png'], f"{read_list_file(tmp/'l.txt')}")

@case('readers', 'value')
def case_list_file_utf8_bom(tmp):
    from unimiss.data import read_list_file
    (tmp/'l.txt').write_bytes('\ufeffa.png\nb.png\n'.encode('utf-8'))
    check(read_list_file(tmp/'l.txt') == [tmp/'a.png', tmp/'b.png'], f"{read_list_file(tmp/'l.txt')}")

@case('readers', 'value')
def case_list_file_paths_with_spaces(tmp):
    from unimiss.data import read_list_file
    (tmp/'l.txt').write_text('my scans/case 1.nii.gz\n')
    check(read_list_file(tmp/'l.txt') == [tmp/'my scans/case 1.nii.gz'], f"{read_list_file(tmp/'l.txt')}")

@case('readers')
def case_binary_file_as_list_file(tmp):
    from unimiss.data import read_list_file
    (tmp/'l.txt').write_bytes(gzip.compress(b'x' * 100))
    with raises(ValueError, 'l.txt', 'line'): read_list_file(tmp/'l.txt')

@case('readers')
def case_missing_list_file(tmp):
    from unimiss.data import Dataset2D
    with raises(FileNotFoundError, 'none.txt'): Dataset2D(tmp/'none.txt')

@case('datasets')
def case_list_names_missing_image(tmp):
    from unimiss.data import Dataset2D, write_list_file
    lst = write_list_file(tmp/'l.txt', [xray_png(tmp/'a.png'), tmp/'gone.png'])
    with raises(FileNotFoundError, 'gone.png'): Dataset2D(lst)

@case('datasets')
def case_dataset_on_error_value(tmp):
    from unimiss.data import Dataset2D
    with raises(ValueError, 'on_error'): Dataset2D([xray_png(tmp/'a.png')], on_error='ignore')

@case('datasets', 'value')
def case_volume_smaller_than_crop_warns(tmp):
    from unimiss.data import Dataset3D
    f = phantom_nifti(tmp/'small.nii.gz', shape=(20, 20, 5))
    with logged() as msgs: Dataset3D([f], img_size=(16, 64, 64), seed=0)[0]
    check(any('small.nii.gz' in m and 'padding' in m for m in msgs), f"no warning naming the file: {msgs}")

@case('datasets', 'value')
def case_cache_same_size_replacement(tmp):
    from unimiss.data import Dataset3D, read_volume
    f = phantom_nifti(tmp/'v.nii', seed=1)
    ds = Dataset3D([f], img_size=(16, 32, 32), cache_dir=tmp/'cache', seed=0)
    ds[0]
    replace_same_size(f, phantom_nifti(tmp/'w.nii', seed=2).read_bytes())
    ds[0]
    from unimiss.data import cache_volume
    cached = np.load(cache_volume(f, tmp/'cache')).astype(np.float32) / 1024
    check(np.array_equal(cached, read_volume(f)), f"the cache serves the replaced file's old voxels "
          f"(max {np.abs(cached - read_volume(f)).max() * 1024:.0f} HU off)")

@case('datasets')
def case_img_size_2d_32(tmp):
    from unimiss.pretrain import load_config
    with raises(ValueError, 'img_size_2d'): load_config(arch='micro', img_size_2d=32)

@case('datasets')
def case_img_size_3d_single_token(tmp):
    from unimiss.pretrain import load_config
    with raises(ValueError, 'img_size_3d'): load_config(arch='micro', img_size_2d=64, img_size_3d=(16, 32, 32))

@case('datasets')
def case_unknown_config_key(tmp):
    from unimiss.pretrain import load_config
    with raises(ValueError, 'weight_decay_final', "did you mean 'weight_decay_end'"): load_config(weight_decay_final=1)

@case('datasets')
def case_missing_list_for_pretraining(tmp):
    from unimiss.pretrain import pretrain
    with raises(FileNotFoundError, 'nolist.txt'):
        pretrain(TINY | dict(synthetic=0, data_dir=str(tmp), list_2d='nolist.txt', use_3d=False, output_dir=str(tmp/'r')))


# ================================================================ preprocessing
def ct_case(src:Path, shape=(48, 48, 30), spacing=(1., 1., 1.), seed=0):
    from unimiss.data import phantom_ct
    src.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(phantom_ct(shape, seed), np.diag([*spacing, 1.])), src)
    return src

PRE = dict(spacing=(1., 1., 3.), tile_depth=8, stride=4, progress=False)

@case('preprocessing', 'value')
def case_labels_round_trip_exactly(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(1., 1., 3.))
    lab = np.zeros((48, 48, 30), np.int32); lab[10:30, 10:30, :] = -5; lab[20:25, 20:25, :] = 70000; lab[30:40, 30:40] = 3
    (tmp/'lab').mkdir(); nib.save(nib.Nifti1Image(lab, np.diag([1., 1., 3., 1.])), tmp/'lab/a.nii.gz')
    m = preprocess_ct(tmp/'src', tmp/'out', labels=tmp/'lab', keep_fraction=1.0, **PRE)
    got = np.concatenate([np.asarray(nib.load(tmp/'out'/o).dataobj) for o in m['cases'][0]['label_outputs']], -1)
    check(set(np.unique(got)) == {-5, 0, 3, 70000}, f"label values after preprocessing: {sorted(np.unique(got))}")

@case('preprocessing')
def case_non_integer_labels(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(1., 1., 3.))
    lab = np.zeros((48, 48, 30), np.float32); lab[10:20, 10:20] = 2.7
    (tmp/'lab').mkdir(); nib.save(nib.Nifti1Image(lab, np.diag([1., 1., 3., 1.])), tmp/'lab/a.nii.gz')
    with raises(ValueError, 'lab/a.nii.gz', 'non-integer'): preprocess_ct(tmp/'src', tmp/'out', labels=tmp/'lab', **PRE)

@case('preprocessing', 'value')
def case_label_resampling_is_nearest(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(0.7, 0.7, 1.3))
    lab = np.zeros((48, 48, 30), np.uint8); lab[5:25, 5:25] = 4; lab[25:45, 25:45] = 9
    (tmp/'lab').mkdir(); nib.save(nib.Nifti1Image(lab, np.diag([0.7, 0.7, 1.3, 1.])), tmp/'lab/a.nii.gz')
    m = preprocess_ct(tmp/'src', tmp/'out', labels=tmp/'lab', **PRE)
    vals = set().union(*[np.unique(np.asarray(nib.load(tmp/'out'/o).dataobj)).tolist() for o in m['cases'][0]['label_outputs']])
    check(vals <= {0, 4, 9}, f"resampled labels hold values {sorted(vals)}")

@case('preprocessing')
def case_label_grid_mismatch(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz')
    (tmp/'lab').mkdir(); nib.save(nib.Nifti1Image(np.zeros((40, 48, 30), np.uint8), np.eye(4)), tmp/'lab/a.nii.gz')
    with raises(ValueError, 'lab/a.nii.gz', 'grid'): preprocess_ct(tmp/'src', tmp/'out', labels=tmp/'lab', **PRE)

@case('preprocessing', 'value')
def case_xray_rerun_with_other_parameters(tmp):
    from unimiss.preprocess import prepare_xrays
    xray_png(tmp/'src/a.png', size=80)
    prepare_xrays(tmp/'src', tmp/'out', size=64, progress=False)
    prepare_xrays(tmp/'src', tmp/'out', size=32, bits=16, progress=False)
    im = Image.open(tmp/'out/a.png')
    check(im.size == (32, 32) and im.mode.startswith('I;16'), f"rerun with --size 32 --bits 16 left {im.size} {im.mode}")

@case('preprocessing', 'value')
def case_xray_rerun_after_same_size_replacement(tmp):
    from unimiss.data import phantom_xray, read_image
    from unimiss.preprocess import prepare_xrays
    arr = (phantom_xray(64, 1) * 65535).round().astype(np.uint16)
    (tmp/'src').mkdir(); Image.fromarray(arr).save(tmp/'src/a.png', compress_level=0)  # size set by the shape alone
    prepare_xrays(tmp/'src', tmp/'out', size=64, bits=16, progress=False)
    Image.fromarray(arr[::-1].copy()).save(tmp/'flip.png', compress_level=0)
    replace_same_size(tmp/'src/a.png', (tmp/'flip.png').read_bytes())
    prepare_xrays(tmp/'src', tmp/'out', size=64, bits=16, progress=False)
    err = np.abs(read_image(tmp/'out/a.png') - read_image(tmp/'flip.png')).mean()
    check(err < 0.01, f"the output of the replaced source is the old picture (mean error {err:.3f})")

@case('preprocessing', 'value')
def case_ct_rerun_with_other_parameters(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(1., 1., 3.))
    a = preprocess_ct(tmp/'src', tmp/'out', **PRE)
    b = preprocess_ct(tmp/'src', tmp/'out', **(PRE | dict(stride=2)))
    check(b['cases'][0]['tile_starts'] != a['cases'][0]['tile_starts'] and b['params']['stride'] == 2,
          f"rerun with stride 2 kept tile starts {b['cases'][0]['tile_starts']}")

@case('preprocessing', 'value')
def case_ct_rerun_after_same_size_replacement(tmp):
    from unimiss.preprocess import preprocess_ct
    f = ct_case(tmp/'src/a.nii', spacing=(1., 1., 3.), seed=1)
    preprocess_ct(tmp/'src', tmp/'out', **PRE)
    replace_same_size(f, ct_case(tmp/'other/b.nii', spacing=(1., 1., 3.), seed=2).read_bytes())
    m = preprocess_ct(tmp/'src', tmp/'out', **PRE)
    out = np.asarray(nib.load(tmp/'out'/m['cases'][0]['outputs'][0]).dataobj)
    fresh = preprocess_ct(tmp/'other', tmp/'out2', **PRE)
    ref = np.asarray(nib.load(tmp/'out2'/fresh['cases'][0]['outputs'][0]).dataobj)
    check(np.array_equal(out, ref), f"stale sub-volume kept: {np.abs(out.astype(int) - ref).max()} HU off")

@case('preprocessing')
def case_pixdim_zero(tmp):
    from unimiss.preprocess import preprocess_ct
    import struct
    data = bytearray(nib.Nifti1Image(np.asarray(nib.load(ct_case(tmp/'x.nii')).dataobj), np.eye(4)).to_bytes())
    data[88:92] = struct.pack('<f', 0.)  # pixdim[3]: nibabel warns and reads 1 mm
    (tmp/'src').mkdir(); (tmp/'src/a.nii').write_bytes(bytes(data))
    with raises(ValueError, 'a.nii', 'pixdim'): preprocess_ct(tmp/'src', tmp/'out', **PRE)

@case('preprocessing')
def case_nan_in_sform(tmp):
    from unimiss.preprocess import preprocess_ct
    f = ct_case(tmp/'src/a.nii.gz')
    img = nib.load(f); hdr = img.header.copy(); hdr['srow_x'][0] = np.nan
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), None, hdr), f)
    with raises(ValueError, 'a.nii.gz'): preprocess_ct(tmp/'src', tmp/'out', **PRE)

@case('preprocessing')
def case_spacing_a_thousandth_mm(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(0.001, 0.001, 0.001))
    with raises(ValueError, 'a.nii.gz'): preprocess_ct(tmp/'src', tmp/'out', **PRE)

@case('preprocessing')
def case_two_voxel_volume(tmp):
    from unimiss.preprocess import preprocess_ct
    nib.save(nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2), np.eye(4)), tmp/'tiny.nii.gz')
    with raises(ValueError, 'tiny.nii.gz'): preprocess_ct(tmp/'tiny.nii.gz', tmp/'out', **PRE)

@case('preprocessing')
def case_all_voxels_below_hu_floor(tmp):
    from unimiss.preprocess import preprocess_ct
    arr = np.random.default_rng(0).integers(-3000, -1500, (48, 48, 30)).astype(np.int16)
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp/'air.nii.gz')
    with raises(ValueError, 'air.nii.gz', 'hu_min'): preprocess_ct(tmp/'air.nii.gz', tmp/'out', **PRE)

@case('preprocessing', 'value')
def case_constant_tiles_not_written(tmp):
    from unimiss.data import phantom_ct
    from unimiss.preprocess import preprocess_ct
    arr = phantom_ct((48, 48, 60)); arr[..., :30] = -2000
    nib.save(nib.Nifti1Image(arr, np.eye(4)), tmp/'half.nii.gz')
    m = preprocess_ct(tmp/'half.nii.gz', tmp/'out', spacing=(1., 1., 1.), tile_depth=8, stride=8, progress=False)
    const = [o for o in m['cases'][0]['outputs'] if np.ptp(np.asarray(nib.load(tmp/'out'/o).dataobj)) == 0]
    check(not const and m['cases'][0]['outputs'], f"constant sub-volumes written: {const}")

@case('preprocessing', 'value')
def case_stray_temporaries_removed(tmp):
    from unimiss.preprocess import preprocess_ct
    ct_case(tmp/'src/a.nii.gz', spacing=(1., 1., 3.))
    (tmp/'out/labels').mkdir(parents=True)
    for name in ('.a_dep0.nii.gz.tmp-ab12cd34.nii.gz', 'labels/.a_dep0.nii.gz.tmp-zz99yy88.nii.gz', '.manifest.json.tmp'):
        (tmp/'out'/name).write_bytes(b'partial')
    preprocess_ct(tmp/'src', tmp/'out', **PRE)
    left = [p.name for p in (tmp/'out').rglob('.*') if p.is_file() and '.tmp' in p.name]
    check(not left, f"temporaries left behind: {left}")

@case('preprocessing', 'value')
def case_ct_skip_records_failure(tmp):
    from unimiss.preprocess import preprocess_ct
    good = ct_case(tmp/'src/a.nii.gz', spacing=(1., 1., 3.))
    (tmp/'src/b.nii.gz').write_bytes(good.read_bytes()[:500])
    m = preprocess_ct(tmp/'src', tmp/'out', on_error='skip', **PRE)
    check(m['n_cases'] == 1 and [f['case'] for f in m['failed']] == ['b'] and 'b.nii.gz' in m['failed'][0]['error'],
          f"manifest: {m['n_cases']} cases, failed {m['failed']}")


# ================================================================ command lines
@case('cli')
def case_cli_preprocess_ct_missing_source(tmp):
    cli_error(cli('preprocess', 'ct', tmp/'nonexistent', tmp/'out', '--no-progress'), 'nonexistent')

@case('cli')
def case_cli_preprocess_xray_missing_source(tmp):
    cli_error(cli('preprocess', 'xray', tmp/'nonexistent', tmp/'out', '--no-progress'), 'nonexistent')

@case('cli')
def case_cli_preprocess_ct_empty_folder(tmp):
    (tmp/'empty').mkdir()
    cli_error(cli('preprocess', 'ct', tmp/'empty', tmp/'out', '--no-progress'), 'empty', 'no CT volumes')

@case('cli')
def case_cli_preprocess_ct_truncated_volume(tmp):
    good = ct_case(tmp/'src/a.nii.gz')
    (tmp/'src/a.nii.gz').write_bytes(good.read_bytes()[:800])
    cli_error(cli('preprocess', 'ct', tmp/'src', tmp/'out', '--no-progress'), 'a.nii.gz')

@case('cli')
def case_cli_pretrain_bad_value(tmp):
    cli_error(cli('pretrain', '--arch', 'mit_huge', '--output_dir', tmp/'r'), 'arch')

@case('cli')
def case_cli_pretrain_missing_config_file(tmp):
    cli_error(cli('pretrain', '--config', tmp/'nope.yaml'), 'nope.yaml')

@case('cli')
def case_cli_pretrain_resume_from_list_pickle(tmp):
    (tmp/'r').mkdir(); torch.save([1, 2, 3], tmp/'r/checkpoint.pth')
    args = [x for k, v in (TINY | dict(epochs=1, use_3d=False)).items() for x in (f'--{k}', _arg(v))]
    cli_error(cli('pretrain', *args, '--output_dir', tmp/'r'), 'checkpoint.pth')

@case('cli', 'value')
def case_cli_pretrain_success_exits_0(tmp):
    from importlib.metadata import entry_points
    args = [x for k, v in (TINY | dict(epochs=1, use_3d=False)).items() for x in (f'--{k}', _arg(v))]
    ep = [e for e in entry_points(group='console_scripts') if e.name == 'unimiss-pretrain'][0]
    code = f"import sys; from {ep.module} import {ep.attr} as m; sys.argv[0] = 'unimiss-pretrain'; sys.exit(m())"
    r = subprocess.run([sys.executable, '-c', code, *args, '--output_dir', str(tmp/'r')], capture_output=True, text=True,
                       env=os.environ | dict(OMP_NUM_THREADS='1'), timeout=300)  # what the console script runs
    check(r.returncode == 0 and (tmp/'r/checkpoint.pth').is_file(), f"exit status {r.returncode}: {r.stderr[-300:]}")

@case('cli')
def case_cli_experiments_unknown_experiment(tmp):
    cli_error(cli('experiments', 'params', 'no_such_experiment'), 'no_such_experiment')


# ================================================================ pretraining
TINY = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=32, batch_size_2d=2, batch_size_3d=1,
            synthetic=2, num_workers=0, progress=False, warmup_epochs=0, interval=1, lr=5e-3, save_every=1)


def run(tmp, **kw):
    from unimiss.pretrain import pretrain
    return pretrain(TINY | dict(output_dir=str(tmp), use_3d=False) | kw)


def ckpt(tmp, name='checkpoint.pth'):
    return torch.load(Path(tmp)/name, weights_only=True)


@contextlib.contextmanager
def patched(obj, name, new):
    old = getattr(obj, name); setattr(obj, name, new)
    try: yield
    finally: setattr(obj, name, old)


@case('pretraining', 'loss')
def case_nan_gradient_with_finite_loss(tmp):
    from unimiss.pretrain import SelfDistillation
    run(tmp/'r', epochs=2, epochs_per_run=1)
    real = SelfDistillation.backward
    def nan_grad(self, *a, **k):
        out = real(self, *a, **k)
        next(p for p in self.student.parameters() if p.grad is not None).grad.fill_(float('nan'))
        return out
    err = None
    with patched(SelfDistillation, 'backward', nan_grad):
        try: run(tmp/'r', epochs=2)
        except FloatingPointError as e: err = e
    state = ckpt(tmp/'r')
    finite = all(torch.isfinite(v).all() for v in state['student'].values())
    check(finite and state['epoch'] == 1, f"checkpoint.pth after a NaN gradient: epoch {state['epoch']}, finite {finite}")
    check(err is not None and 'checkpoint.pth' in str(err), f"no FloatingPointError naming the last good checkpoint: {err}")

@case('pretraining', 'loss')
def case_nan_weights_never_saved(tmp):
    from unimiss.pretrain import SelfDistillation
    run(tmp/'r', epochs=2, epochs_per_run=1)
    real = SelfDistillation.update
    def poison(self, momentum):
        real(self, momentum)
        with torch.no_grad(): next(self.teacher.parameters()).fill_(float('inf'))
    err = None
    with patched(SelfDistillation, 'update', poison):
        try: run(tmp/'r', epochs=2)
        except FloatingPointError as e: err = e
    state = ckpt(tmp/'r')
    check(all(torch.isfinite(v).all() for v in state['teacher'].values()), "a checkpoint with inf weights was saved")
    check(err is not None and 'checkpoint.pth' in str(err), f"no FloatingPointError naming the last good checkpoint: {err}")

@case('pretraining')
def case_nonfinite_loss(tmp):
    from unimiss.pretrain import SyntheticViews
    class NaNViews(SyntheticViews):
        def __getitem__(self, i): return [v * float('nan') for v in super().__getitem__(i)]
    from unimiss.pretrain import pretrain
    with raises(FloatingPointError, 'non-finite loss', 'last good checkpoint'):
        pretrain(TINY | dict(output_dir=str(tmp/'r'), use_3d=False, epochs=1), datasets={2: NaNViews(2, (3, 64, 64))})

@case('pretraining')
def case_resume_on_other_world_size(tmp):
    run(tmp/'r', epochs=2, epochs_per_run=1)
    state = ckpt(tmp/'r'); state['world_size'] = 2; state['rng'] = state['rng'] * 2
    torch.save(state, tmp/'r/checkpoint.pth')
    with raises(ValueError, 'checkpoint.pth', '2-process'): run(tmp/'r', epochs=2)

@case('pretraining', 'value')
def case_truncated_checkpoint_falls_back_to_periodic(tmp):
    ref = run(tmp/'ref', epochs=3)
    run(tmp/'r', epochs=3, epochs_per_run=2)
    p = tmp/'r/checkpoint.pth'; p.write_bytes(p.read_bytes()[:p.stat().st_size // 2])
    (tmp/'r/checkpoint0002.pth').unlink()  # the newest intact one is epoch 1's
    with logged() as msgs: run(tmp/'r', epochs=3)
    a, b = ckpt(tmp/'ref')['teacher'], ckpt(tmp/'r')['teacher']
    check(all(torch.equal(a[k], b[k]) for k in a), "the run resumed from the periodic checkpoint is not bit-identical")
    check(any('checkpoint0001.pth' in m for m in msgs), f"no WARNING naming the periodic checkpoint: {msgs}")
    assert ref['finished']

@case('pretraining', 'value')
def case_partial_last_log_line(tmp):
    run(tmp/'r', epochs=2, epochs_per_run=1)
    with open(tmp/'r/log.jsonl', 'a') as f: f.write('{"type": "iter", "ep')
    res = run(tmp/'r', epochs=2)
    from unimiss.pretrain import read_log
    check(res['finished'] and [r['epoch'] for r in read_log(tmp/'r') if r['type'] == 'epoch'] == [0, 1], "log after resume")

@case('pretraining', 'value')
def case_stray_checkpoint_temporaries_removed(tmp):
    (tmp/'r').mkdir()
    for name in ('.checkpoint.pth.tmp', '.checkpoint.pth.tmp-k3j4h5g6.pth', '.log.jsonl.tmp', '.config.yaml.tmp'):
        (tmp/'r'/name).write_bytes(b'partial')
    run(tmp/'r', epochs=1)
    left = sorted(p.name for p in (tmp/'r').iterdir() if '.tmp' in p.name)
    check(not left, f"temporaries left behind: {left}")

@case('pretraining')
def case_resume_with_changed_config(tmp):
    run(tmp/'r', epochs=2, epochs_per_run=1)
    with raises(ValueError, 'cannot resume', 'lr'): run(tmp/'r', epochs=2, lr=1e-2)

@case('pretraining')
def case_checkpoint_without_epoch(tmp):
    run(tmp/'r', epochs=2, epochs_per_run=1, save_every=0)  # no periodic checkpoint to fall back to
    state = ckpt(tmp/'r'); del state['epoch']; torch.save(state, tmp/'r/checkpoint.pth')
    with raises(ValueError, 'checkpoint.pth', 'epoch'): run(tmp/'r', epochs=2, save_every=0)

@case('pretraining')
def case_items_not_pairs(tmp):
    from unimiss.pretrain import pretrain
    class One(torch.utils.data.Dataset):
        def __len__(self): return 2
        def __getitem__(self, i): return torch.rand(3, 64, 64)
    with raises(ValueError, 'pairs of views'):
        pretrain(TINY | dict(output_dir=str(tmp/'r'), use_3d=False, epochs=1), datasets={2: One()})


# ================================================================ checkpoints
def micro_checkpoint(tmp, arch='micro', **state):
    from unimiss.mit import MIT_ARCHS, MiT
    torch.manual_seed(0)
    mit = MiT(spatial_dims=(2,), img_size2d=64, **MIT_ARCHS[arch])
    path = Path(tmp)/f'{arch}.pth'
    torch.save(dict(teacher={f'backbone.{k}': v for k, v in mit.state_dict().items()}, epoch=1, **state), path)
    return path

def seg(arch='micro'):
    from unimiss.finetune import build_model
    return build_model('segmentation', 2, 2, arch=arch, img_size=64)

@case('checkpoints')
def case_small_checkpoint_into_tiny_model(tmp):
    from unimiss.finetune import load_pretrained
    with raises(ValueError, 'small', 'tiny'): load_pretrained(seg('tiny'), micro_checkpoint(tmp, 'small'))

@case('checkpoints')
def case_small_checkpoint_into_tiny_build_model(tmp):
    from unimiss.finetune import build_model
    with raises(ValueError, 'small', 'tiny'):
        build_model('classification', 2, 2, arch='tiny', init='unimiss', checkpoint=micro_checkpoint(tmp, 'small'))

@case('checkpoints', 'value')
def case_partial_load_warns_naming_both(tmp):
    from unimiss.finetune import load_pretrained
    with logged() as msgs: load_pretrained(seg('tiny'), micro_checkpoint(tmp, 'small'), strict=False)
    check(any('small' in m and 'tiny' in m for m in msgs), f"strict=False: no WARNING naming both architectures: {msgs}")

@case('checkpoints')
def case_nan_weights_in_checkpoint(tmp):
    from unimiss.finetune import load_pretrained
    path = micro_checkpoint(tmp)
    state = torch.load(path, weights_only=True); next(iter(state['teacher'].values())).fill_(float('nan'))
    torch.save(state, path)
    with raises(ValueError, 'micro.pth', 'NaN'): load_pretrained(seg(), path)

@case('checkpoints')
def case_integer_weights_in_checkpoint(tmp):
    from unimiss.finetune import load_pretrained
    path = micro_checkpoint(tmp)
    state = torch.load(path, weights_only=True)
    k = next(iter(state['teacher'])); state['teacher'][k] = state['teacher'][k].to(torch.int32)
    torch.save(state, path)
    with raises(ValueError, 'micro.pth', 'floating'): load_pretrained(seg(), path)

@case('checkpoints')
def case_list_pickle_as_checkpoint(tmp):
    from unimiss.finetune import load_pretrained
    torch.save([1, 2], tmp/'list.pth')
    with raises(ValueError, 'list.pth', 'mapping'): load_pretrained(seg(), tmp/'list.pth')

@case('checkpoints')
def case_str_pickle_as_checkpoint(tmp):
    from unimiss.checkpoint import load_official
    torch.save('weights', tmp/'str.pth')
    with raises(ValueError, 'str.pth', 'mapping'): load_official(tmp/'str.pth')

@case('checkpoints')
def case_tensor_pickle_as_checkpoint(tmp):
    from unimiss.pretrain import load_checkpoint
    torch.save(torch.ones(3), tmp/'t.pth')
    with raises(ValueError, 't.pth', 'mapping'): load_checkpoint(tmp/'t.pth')

@case('checkpoints')
def case_corrupted_checkpoint_byte(tmp):
    from unimiss.pretrain import load_checkpoint, save_checkpoint
    p = save_checkpoint(dict(epoch=1, teacher=dict(w=torch.randn(256, 256))), tmp/'c.pth')
    b = bytearray(p.read_bytes()); b[len(b) // 2] ^= 0xFF; p.write_bytes(bytes(b))
    with raises(ValueError, 'c.pth', 'corrupted'): load_checkpoint(p)

@case('checkpoints')
def case_truncated_checkpoint(tmp):
    from unimiss.checkpoint import read_checkpoint
    torch.save(dict(w=torch.randn(100)), tmp/'c.pth'); p = tmp/'c.pth'
    p.write_bytes(p.read_bytes()[:200])
    with raises(ValueError, 'c.pth'): read_checkpoint(p)

@case('checkpoints')
def case_missing_checkpoint(tmp):
    from unimiss.finetune import load_pretrained
    with raises(FileNotFoundError, 'gone.pth'): load_pretrained(seg(), tmp/'gone.pth')

@case('checkpoints')
def case_official_keys_with_wrong_shapes(tmp):
    from unimiss.checkpoint import load_official
    torch.save({'transformer.pos_embed2D1': torch.zeros(5), 'transformer.block1.0.norm1.weight': torch.ones(4)}, tmp/'o.pth')
    with raises(ValueError, 'pos_embed2D1'): load_official(tmp/'o.pth')

@case('checkpoints')
def case_teacher_entry_not_a_state_dict(tmp):
    from unimiss.checkpoint import select_network
    torch.save(dict(teacher=[1, 2], epoch=3), tmp/'t.pth')
    with raises(ValueError, "'teacher'", 'list'): select_network(tmp/'t.pth')

@case('checkpoints')
def case_teacher_entry_not_a_state_dict_finetune(tmp):
    from unimiss.finetune import load_pretrained
    torch.save(dict(teacher='weights', epoch=3), tmp/'t.pth')
    with raises(ValueError, 't.pth', "'teacher'", 'str'): load_pretrained(seg(), tmp/'t.pth')

@case('checkpoints')
def case_student_missing_from_teacher_only_checkpoint(tmp):
    from unimiss.finetune import load_pretrained
    with raises(KeyError, "'student'", 'micro.pth'): load_pretrained(seg(), micro_checkpoint(tmp), which='student')

@case('checkpoints')
def case_layout_mismatch(tmp):
    from unimiss.finetune import load_pretrained
    with raises(ValueError, 'micro.pth', 'official'): load_pretrained(seg(), micro_checkpoint(tmp), expect='official')


# ================================================================ runners
@pytest.mark.parametrize('area,name,kind,fn', CASES, ids=[f"{a}-{n}" for a, n, _, _ in CASES])
def test_bad_input(area, name, kind, fn, tmp_path):
    fn(tmp_path)


def test_table_size():
    assert len(CASES) >= 60, len(CASES)


def sweep() -> dict:
    "Run every case and count the outcomes."
    counts = dict(tried=0, correct=0, named_error=0, silent=0, crash=0, data_loss=0)
    logging.getLogger('unimiss').propagate = False  # quiet, while `logged` still sees the records
    for area, name, kind, fn in CASES:
        counts['tried'] += 1
        with tempfile.TemporaryDirectory() as d:
            try: fn(Path(d)); outcome = 'named_error' if kind == 'error' else 'correct'
            except Crash as e: outcome, why = 'crash', e
            except (Silent, AssertionError) as e: outcome, why = ('data_loss' if kind == 'loss' else 'silent'), e
            except Exception as e: outcome, why = 'crash', f"{type(e).__name__}: {e}"
        counts[outcome] += 1
        print(f"{outcome:12s} {area}/{name}" + ('' if outcome in ('correct', 'named_error') else f": {str(why)[:160]}"), flush=True)
    return counts


if __name__ == '__main__':
    print(json.dumps(sweep()))


def test_kill_and_rerun_preprocess(tmp_path):
    "`kill -9` of `unimiss-preprocess` half-way through writing a file; the rerun is byte-identical and removes the temporary."
    sys.path.insert(0, str(REPO/'bench'))
    import kill_test  # bench/kill_test.py: 5 random moments and 1 write of each command
    s = kill_test.main(['--kills', '0', '--at-write', '1', '--only', 'preprocess', '--small', '--work', str(tmp_path)])['preprocess']
    assert (s['trials'], s['at_write'], s['identical'], s['left_behind']) == (1, 1, 1, 0), s

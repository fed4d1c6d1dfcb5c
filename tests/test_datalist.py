"""Fine-tuning on your own data: the `datalist_*` protocols of `unimiss.protocols` on tiny synthetic MONAI-style JSON
datalists (one 2D segmentation, one 3D classification task, smoke sizes), the named errors of bad datalists, the
experiment notebook's `dataset=datalist`, and TensorBoard logging of a fine-tuning run."""
import json, logging, sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from unimiss import casedata, protocols
from unimiss import finetune as ft
from unimiss.evaluate import DatalistError, EmptySplitError, MissingImageError, UnknownLabelError

ROOT = Path(__file__).resolve().parents[1]


def _write(path:Path, dl:dict) -> Path:
    path.write_text(json.dumps(dl)); return path


@pytest.fixture
def seg2d(tmp_path):
    "Five 48x48 PNG radiographs with label maps of two bright structures (values 1, 2) on a background."
    rng, items = np.random.default_rng(0), []
    for i in range(5):
        img, lab = (rng.random((48, 48)) * 60).astype(np.uint8), np.zeros((48, 48), np.uint8)
        lab[6 + i:22 + i, 6:22] = 1; lab[28:44, 24 + i:40] = 2; img[lab > 0] += 150
        Image.fromarray(img).save(tmp_path/f'img{i}.png'); Image.fromarray(lab).save(tmp_path/f'lab{i}.png')
        items.append(dict(image=f'img{i}.png', label=f'lab{i}.png'))
    return _write(tmp_path/'seg2d.json', dict(training=items[:3], validation=items[3:4], test=items[4:]))


@pytest.fixture
def cls3d(tmp_path):
    "Six small CT volumes (HU, 8 mm voxels): class 1 has a bright blob, class 0 none."
    (tmp_path/'ct').mkdir()
    rng, items = np.random.default_rng(1), []
    for i in range(6):
        hu = rng.normal(-800, 30, (64, 64, 16)).astype(np.float32)
        if i % 2: hu[20:40, 20:40, 4:12] = 200
        nib.save(nib.Nifti1Image(hu, np.diag([8., 8., 8., 1.])), tmp_path/'ct'/f'case{i}.nii.gz')
        items.append(dict(image=f'ct/case{i}.nii.gz', label=i % 2))
    return _write(tmp_path/'cls3d.json', dict(training=items[:4], validation=items[4:]))


def _cfg(protocol, datalist, out, **options):
    return dict(protocol=protocol, smoke=True, out_dir=str(out), options=dict(datalist=str(datalist), **options))


def test_seg2d_datalist_finetunes(seg2d, tmp_path):
    m = ft.finetune(_cfg('datalist_seg2d', seg2d, tmp_path/'run', classes=['background', 'top', 'bottom']))
    assert m['cases'] == dict(train=3, val=1, test=1) and m['evaluated_on'] == 'test'
    assert set(m['dice']) == {'top', 'bottom'} and 0 <= m['mean_dice'] <= 1
    for f in ('metrics.json', 'cases.csv', 'figures/overlays.png', 'checkpoints/best.pt'):
        assert (tmp_path/'run'/f).is_file(), f


def test_cls3d_datalist_finetunes(cls3d, tmp_path):
    m = ft.finetune(_cfg('datalist_cls3d', cls3d, tmp_path/'run', num_classes=2))
    assert m['cases'] == dict(train=4, val=2) and m['evaluated_on'] == 'val'
    assert 0 <= m['auc'] <= 1
    assert protocols.protocol_of(ft.load_config(_cfg('datalist_cls3d', cls3d, tmp_path, num_classes=2))).classes == ('class 0', 'class 1')


def test_bad_datalists_are_named(seg2d, cls3d, tmp_path):
    splits = lambda p, dl, **o: protocols.get_splits(ft.load_config(_cfg(p, dl, tmp_path, **o)))
    with pytest.raises(MissingImageError, match='does not exist'): splits('datalist_seg2d', tmp_path/'nope.json', num_classes=3)
    d = json.loads(seg2d.read_text()); d['training'][1]['label'] = 'missing.png'
    with pytest.raises(MissingImageError, match=r"training\[1\] label .*missing.png does not exist"):
        splits('datalist_seg2d', _write(tmp_path/'a.json', d), num_classes=3)
    d = json.loads(seg2d.read_text()); d['training'][0]['label'] = 2
    with pytest.raises(DatalistError, match=r"training\[0\] label must be the path of a label map"):
        splits('datalist_seg2d', _write(tmp_path/'b.json', d), num_classes=3)
    d = json.loads(cls3d.read_text()); d['validation'][0]['label'] = 'yes'
    with pytest.raises(UnknownLabelError, match=r"validation\[0\] has label 'yes'; expected a class index 0..1"):
        splits('datalist_cls3d', _write(tmp_path/'c.json', d), num_classes=2)
    d = json.loads(cls3d.read_text()); d['validation'] = []
    with pytest.raises(EmptySplitError, match="'validation' split is empty"):
        splits('datalist_cls3d', _write(tmp_path/'d.json', d), num_classes=2)
    with pytest.raises(ValueError, match='needs options.num_classes >= 2 or options.classes'):
        ft.load_config(_cfg('datalist_cls3d', cls3d, tmp_path))
    with pytest.raises(ValueError, match='needs options.datalist'):
        ft.load_config(dict(protocol='datalist_seg3d', options=dict(num_classes=3)))
    # a label value outside the classes is named with its case when the case is read
    case = protocols.get_splits(ft.load_config(_cfg('datalist_seg2d', seg2d, tmp_path, num_classes=2)))['train'][0]
    with pytest.raises(ValueError, match=r"case 'img0': unexpected label value\(s\) \[2\]"):
        casedata.read_xray_case(case, (64, 64), num_classes=2)


def test_experiment_notebook_takes_a_datalist(seg2d, tmp_path):
    ex = pytest.importorskip('unimiss.experiments')
    pytest.importorskip('papermill')
    run = ex.run_experiment('finetune_seg2d', overrides=dict(dataset='datalist', datalist=str(seg2d), num_classes=3),
                            tag='dl', runs_dir=tmp_path/'runs', experiments_dir=ROOT/'nbs'/'experiments', quiet=True)
    metrics = json.loads((run/'metrics.json').read_text())
    assert metrics['protocol'] == 'datalist_seg2d' and metrics['cases'] == dict(train=3, val=1, test=1)
    assert set(metrics['metrics']) == {'dice_class_1', 'dice_class_2', 'mean_dice'}
    assert (run/'figures'/'overlays.png').is_file()
    assert json.loads((run/'run.json').read_text())['status'] == 'ok'


def test_tensorboard_logging(seg2d, tmp_path):
    pytest.importorskip('tensorboard')
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    ft.finetune(dict(_cfg('datalist_seg2d', seg2d, tmp_path/'run', num_classes=3), tensorboard=True))
    acc = EventAccumulator(str(tmp_path/'run'/'tensorboard')); acc.Reload()
    assert {'train_loss', 'lr', 'val_mean_dice'} <= set(acc.Tags()['scalars'])
    assert [e.step for e in acc.Scalars('train_loss')] == [1, 2]  # one point per epoch (smoke: two epochs)


def test_tensorboard_missing_is_skipped_with_a_message(seg2d, tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)  # as if tensorboard were not installed
    with caplog.at_level(logging.WARNING, logger='unimiss.engine'):
        m = ft.finetune(dict(_cfg('datalist_seg2d', seg2d, tmp_path/'run', num_classes=3), tensorboard=True))
    assert 'tensorboard package is not installed' in caplog.text and m['epochs_run'] == 2
    assert not (tmp_path/'run'/'tensorboard').exists()

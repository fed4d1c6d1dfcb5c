"""Smoke run of the UniMiSS+ objective through the pretraining entry point (`objective: unimiss_plus`): a CT+DRR
epoch and an X-ray epoch of a small MiT+ on synthetic data, per-term logs, exact resume (also with masked
reconstruction), the official epoch plan, and the config checks."""
import pytest
import torch

from unimiss.mitplus import MITPLUS_ARCHS, load_official_plus
from unimiss.pretrain import load_checkpoint, load_config, pretrain, read_log

PLUS = dict(objective='unimiss_plus', arch='plus_micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=64,
            batch_size_2d=2, batch_size_3d=1, synthetic=2, num_workers=0, progress=False, warmup_epochs=1, interval=1,
            lr=5e-3, clip_grad=0.)


def plus(tmp, **kw):
    return load_config(PLUS | dict(output_dir=str(tmp)) | kw)


@pytest.mark.parametrize("mask", [0., 0.5])
def test_smoke_run_logs_every_term_and_resumes_exactly(tmp_path, mask):
    straight = pretrain(plus(tmp_path/'straight', epochs=2, recon_mask_ratio=mask))
    pretrain(plus(tmp_path/'split', epochs=2, epochs_per_run=1, recon_mask_ratio=mask))
    split = pretrain(plus(tmp_path/'split', epochs=2, recon_mask_ratio=mask))
    assert straight['finished'] and split['finished'] and 'teacher' in straight
    epochs = [r for r in read_log(straight['log']) if r['type'] == 'epoch']
    assert [r['dim'] for r in epochs] == [3, 2]   # the official UniMiSS+ plan: a CT+DRR epoch first, then X-rays
    log = {r['dim']: r for r in epochs}
    assert {'loss_ct', 'loss_drr', 'loss_slices', 'loss_re_ct', 'loss_re_drr'} <= set(log[3])
    assert {'loss_2d', 'loss_re_2d'} <= set(log[2])
    log = list(log.values())
    assert all(torch.isfinite(torch.tensor(v)) for r in log for k, v in r.items() if k.startswith('loss'))
    a, b = load_checkpoint(straight['checkpoint']), load_checkpoint(split['checkpoint'])
    for net in ('student', 'teacher'):
        for k in a[net]:
            assert torch.equal(a[net][k], b[net][k]), (net, k)
    if mask: return
    assert any(k.startswith('backbone.recon.') for k in a['teacher'])   # the reconstruction head is trained and kept
    # the exported teacher is in the authors' UniMissPlus layout and loads back strictly, bit-exactly
    m = load_official_plus(straight['teacher']['official'], **MITPLUS_ARCHS['plus_micro'])
    for k, v in m.state_dict().items():
        assert torch.equal(v, a['teacher']['backbone.' + k]), k


@pytest.mark.parametrize("length, first, iters", [("auto", 0, [2, 2, 2]), ("own", 0, [2, 1, 2]),
                                                  ("own", 2, [1, 2, 1])])
def test_epoch_plan_as_officially_run(tmp_path, length, first, iters):
    """By default a UniMiSS+ run starts with a CT+DRR epoch and an X-ray epoch runs as many iterations as a CT
    epoch (2 CT items at batch 1; 2 X-rays at batch 2 make one X-ray batch, drawn twice); both are options."""
    res = pretrain(plus(tmp_path, epochs=3, synthetic=2, epoch_length_2d=length, first_dim=first, freeze_last_layer=0))
    epochs = [r for r in read_log(res['log']) if r['type'] == 'epoch']
    dims = [3, 2, 3] if first in (0, 3) else [2, 3, 2]
    assert [r['dim'] for r in epochs] == dims
    assert [b['iteration'] - a for a, b in zip([0] + [r['iteration'] for r in epochs], epochs)] == iters


def test_unimiss_keeps_its_own_plan():
    cfg = load_config(arch='micro')
    assert cfg.plan_first_dim == 2 and not cfg.ct_length_2d
    plus_cfg = load_config(PLUS)
    assert plus_cfg.plan_first_dim == 3 and plus_cfg.ct_length_2d
    assert not load_config(PLUS | dict(use_2d=False)).ct_length_2d


def test_config_checks():
    with pytest.raises(ValueError, match="do not fit"):
        load_config(PLUS | dict(arch='micro'))
    with pytest.raises(ValueError, match="objective must be"):
        load_config(PLUS | dict(objective='unimis'))
    with pytest.raises(ValueError, match="weight_drr must be >= 0"):
        load_config(PLUS | dict(weight_drr=-1))
    with pytest.raises(ValueError, match="epoch_length_2d must be"):
        load_config(PLUS | dict(epoch_length_2d='3d'))
    with pytest.raises(ValueError, match="first_dim must be"):
        load_config(PLUS | dict(first_dim=1))
    with pytest.raises(ValueError, match="recon_loss_pixels must be"):
        load_config(PLUS | dict(recon_loss_pixels='some'))
    assert load_config(PLUS | dict(grad_checkpointing=True)).grad_checkpointing   # MiT+ recomputes blocks too


def test_ct_drr_pairs_from_files(tmp_path):
    "With files, each sub-volume is paired with the DRR PNG `unimiss-preprocess drr` wrote next to it."
    pytest.importorskip("diffdrr")
    from unimiss.data import phantom_ct, write_list_file, write_nifti
    from unimiss.drr import write_drrs
    from unimiss.pretrain_plus import PairedViews, plus_datasets
    vols = [write_nifti(tmp_path / "ct" / f"s{k}.nii.gz", phantom_ct((80, 80, 24), seed=k), spacing=(4.0, 4.0, 3.0))
            for k in range(2)]
    write_list_file(tmp_path / "ct.txt", vols, tmp_path)
    cfg = load_config(PLUS | dict(synthetic=0, data_dir=str(tmp_path), list_3d='ct.txt', use_2d=False))
    with pytest.raises(FileNotFoundError, match="have no DRR"):
        plus_datasets(cfg)
    write_drrs(tmp_path / "ct", geometry="parallel", progress=False)
    ds = plus_datasets(cfg)[3]
    assert isinstance(ds, PairedViews) and len(ds) == 2
    (ct1, drr1), (ct2, drr2) = ds[0]
    assert ct1.shape == (1, 16, 64, 64) and drr1.shape == (3, 64, 64)


@pytest.mark.parametrize("name", ["pretrain_plus-paper.yaml", "pretrain_plus-sample.yaml"])
def test_plus_configs_are_valid(name):
    "The experiment configs give a valid UniMiSS+ PretrainConfig (as nbs/experiments/pretrain.ipynb builds it)."
    import yaml
    from pathlib import Path
    y = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / name).read_text())
    keys = ('img_size_2d', 'img_size_3d', 'arch', 'out_dim', 'epochs', 'interval', 'batch_size_2d', 'batch_size_3d',
            'lr', 'warmup_epochs')
    cfg = load_config({k: y[k] for k in keys} | y['pretrain_options'])
    assert cfg.objective == 'unimiss_plus' and cfg.arch in ('plus', 'plus_micro')

"Fine-tuning: paper protocols on phantom datasets in the official layouts, configs, bad inputs, and starting from real `unimiss.pretrain` checkpoints."
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from unimiss.checkpoint import to_official_checkpoint
from unimiss.casedata import read_ct_case
from unimiss.finetune import build_model, finetune, load_config, load_pretrained, make_demo_checkpoints
from unimiss.protocols import PROTOCOLS, bcv_cases, jsrt_cases, label_fraction_subset, ricord_cases, write_demo_dataset

OUTPUTS = {'config.yaml', 'metrics.json', 'cases.csv', 'history.csv', 'checkpoints/best.pt', 'checkpoints/last.pt',
           'figures/training_curves.png'}


def files(run: Path) -> set:
    return {p.relative_to(run).as_posix() for p in run.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp('demo')
    for name in ('bcv', 'ricord', 'jsrt', 'chestxr'): write_demo_dataset(name, root / name, n_cases=4)
    return root


@pytest.mark.parametrize('name', ['bcv', 'ricord', 'jsrt', 'chestxr'])
def test_paper_protocol_smoke(demo, tmp_path, name):
    pr = PROTOCOLS[name]
    m = finetune(dict(protocol=name, smoke=True, data_root=str(demo / name), out_dir=str(tmp_path), keep_last=True))
    extra = {'figures/roc.png'} if pr.kind == 'classification' else {'figures/overlays.png'}
    assert files(tmp_path) == OUTPUTS | extra
    saved = json.loads((tmp_path / 'metrics.json').read_text())
    assert saved['protocol'] == name and saved['epochs_run'] == 2
    if pr.kind == 'segmentation':
        names = pr.classes if pr.multilabel else pr.classes[1:]
        assert set(m['dice']) == set(names) and 'mean_dice' in m
        assert ('mean_jaccard' in m) == pr.jaccard
    else:
        assert {'acc', 'auc', 'ap'} <= set(m)
        assert ({'sensitivity', 'specificity'} <= set(m)) == (len(pr.classes) == 2)
    ck = torch.load(tmp_path / 'checkpoints' / 'last.pt', weights_only=True)
    assert ck['epoch'] == 2 and ck['config']['protocol'] == name
    rows = (tmp_path / 'cases.csv').read_text().splitlines()
    assert len(rows) == 1 + m['cases'][m['evaluated_on']]


def test_yaml_config_and_label_fraction(demo, tmp_path):
    cfg = dict(protocol='ricord', smoke=True, data_root=str(demo / 'ricord'), out_dir=str(tmp_path / 'run'),
               label_fraction=0.5, seed=3, epochs=1)
    (tmp_path / 'c.yaml').write_text(yaml.safe_dump(cfg))
    m = finetune(tmp_path / 'c.yaml')
    assert m['cases']['train'] == 2  # 4 cases, stratified: one per class
    saved = yaml.safe_load((tmp_path / 'run' / 'config.yaml').read_text())
    assert saved['label_fraction'] == 0.5 and saved['img_size'] == [16, 64, 64]
    assert load_config(tmp_path / 'c.yaml') == load_config(cfg)


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown fine-tuning config key\(s\): 'epoch' \(did you mean 'epochs'\?\)"): load_config(dict(protocol='bcv', epoch=3))
    with pytest.raises(ValueError, match="label_fraction must be in"): load_config(dict(protocol='bcv', label_fraction=0))
    with pytest.raises(ValueError, match="img_size must be 3 sizes"): load_config(dict(protocol='bcv', img_size=[48, 100, 100]))
    with pytest.raises(ValueError, match="spacing must be three"): load_config(dict(protocol='ricord', spacing=[2, 2]))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['lists'\]"): load_config(dict(protocol='ricord', options=dict(lists='x')))
    with pytest.raises(ValueError, match="batch_size must be int, got 2.5"): load_config(dict(protocol='jsrt', batch_size=2.5))
    with pytest.raises(ValueError, match="deep_supervision is for segmentation"): load_config(dict(protocol='chestxr', deep_supervision=True))
    with pytest.raises(FileNotFoundError, match="config file not found"): load_config('nope.yaml')
    with pytest.raises(ValueError, match="needs `data_root`"): finetune(dict(protocol='jsrt', smoke=True))


def test_paper_defaults():
    c = load_config(dict(protocol='bcv'))
    assert (c.lr, c.epochs, c.iters_per_epoch, c.deep_supervision, c.img_size) == (1e-4, 100, 250, True, (48, 192, 192))
    c = load_config(dict(protocol='ricord'))
    assert (c.lr, c.batch_size, c.epochs, c.iters_per_epoch * c.batch_size, c.patience, c.img_size, c.spacing) == \
        (1e-5, 8, 200, 512, 30, (64, 128, 128), (2.0, 2.0, 2.0))
    c = load_config(dict(protocol='chestxr'))
    assert (c.lr, c.weight_decay, c.batch_size, c.epochs, c.lr_schedule, c.img_size) == (1e-4, 3e-5, 32, 30, 'poly', (224, 224))
    c = load_config(dict(protocol='jsrt'))
    assert (c.lr, c.lr_schedule, c.img_size) == (1e-4, 'poly', (224, 224))


def test_bad_inputs_name_the_case(demo, tmp_path):
    # missing split entry
    bad = write_demo_dataset('ricord', tmp_path / 'ricord', n_cases=2)
    (bad / 'images' / 'case001.nii.gz').unlink()
    with pytest.raises(FileNotFoundError, match="case 'case001'.*RICORD_train.txt"): ricord_cases(bad)
    # image/label shape mismatch
    b = write_demo_dataset('bcv', tmp_path / 'bcv', n_cases=1)
    spec = json.loads((b / 'dataset.json').read_text())
    from unimiss.data import write_nifti
    write_nifti(b / 'labels' / 'case000.nii.gz', np.zeros((10, 10, 10), np.uint8))
    case = bcv_cases(b)['train'][0]
    with pytest.raises(ValueError, match="case 'case000'.*has shape"): read_ct_case(case, (6., 6., 6.), 14)
    # unexpected label values
    write_nifti(b / 'labels' / 'case000.nii.gz', np.full((64, 64, 24), 20, np.uint8))
    with pytest.raises(ValueError, match=r"case 'case000': unexpected label value\(s\) \[20\]"): read_ct_case(case, (6., 6., 6.), 14)
    # ... and the same through `finetune`
    with pytest.raises(ValueError, match="case 'case000'"):
        finetune(dict(protocol='bcv', smoke=True, data_root=str(b), out_dir=str(tmp_path / 'run')))
    # a split entry without a label
    spec['training'].append(dict(image='images/case000.nii.gz'))
    (b / 'dataset.json').write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="entry 1 of 'training' needs 'image' and 'label'"): bcv_cases(b)
    # a JSRT mask of another size
    j = write_demo_dataset('jsrt', tmp_path / 'jsrt', n_cases=2)
    Image.fromarray(np.zeros((5, 5), np.uint8)).save(j / 'Masks' / 'lung' / 'JPCTR000.gif')
    with pytest.raises(ValueError, match="case 'JPCTR000'.*mask"):
        finetune(dict(protocol='jsrt', smoke=True, data_root=str(j), out_dir=str(tmp_path / 'run2')))


def test_label_fraction_nested_and_stratified():
    cases = [dict(name=str(i), label=i % 3) for i in range(300)]
    subs = {f: label_fraction_subset(cases, f, seed=7, stratify=True) for f in (0.01, 0.1, 1.0)}
    assert [len(subs[f]) for f in (0.01, 0.1, 1.0)] == [3, 30, 300]
    assert {c['name'] for c in subs[0.01]} <= {c['name'] for c in subs[0.1]}
    assert sorted(c['label'] for c in subs[0.01]) == [0, 1, 2]
    assert label_fraction_subset(cases, 0.1, seed=8, stratify=True) != subs[0.1]


def test_init_from_real_pretraining_run(tmp_path, demo):
    "A (tiny, synthetic-data) `unimiss.pretrain` run: its training checkpoint and both exports initialise the same model."
    from unimiss.pretrain import pretrain
    out = tmp_path / 'pre'
    res = pretrain(dict(synthetic=2, arch='tiny', img_size_2d=64, img_size_3d=(16, 64, 64), epochs=2, interval=1,
                        batch_size_2d=2, batch_size_3d=2, out_dim=32, warmup_epochs=0, device='cpu', num_workers=0,
                        output_dir=str(out), progress=False))
    ckpt = out / 'checkpoint.pth'
    exported = {p.name: p for p in out.glob('teacher_*.pth')}
    assert set(exported) == {'teacher_backbone.pth', 'teacher_official.pth'}, res
    models = []
    for init, src in (('unimiss', ckpt), ('unimiss', exported['teacher_backbone.pth']), ('official', exported['teacher_official.pth'])):
        models.append(build_model('segmentation', 3, 3, 'tiny', (32, 64, 64), init=init, checkpoint=src))
    ref = torch.load(ckpt, weights_only=True)['teacher']
    for m in models:
        torch.testing.assert_close(m.backbone.stages[2].blocks[0].attn.kv.weight, ref['backbone.stages.2.blocks.0.attn.kv.weight'])
        torch.testing.assert_close(m.backbone.stages[0].pos_embed['3d'], models[0].backbone.stages[0].pos_embed['3d'])
    # the student on request, and a classifier that keeps the encoder only
    st = build_model('classification', 2, 3, 'tiny', 96, init='unimiss', checkpoint=ckpt, which='student')
    torch.testing.assert_close(st.backbone.stages[1].blocks[0].mlp.fc1.weight,
                               torch.load(ckpt, weights_only=True)['student']['backbone.stages.1.blocks.0.mlp.fc1.weight'])
    # fine-tune from the official export through `finetune`
    m = finetune(dict(protocol='jsrt', smoke=True, arch='tiny', data_root=str(demo / 'jsrt'), out_dir=str(tmp_path / 'run'),
                      init='official', checkpoint=str(exported['teacher_official.pth']), epochs=1, iters_per_epoch=1))
    assert m['init'] == 'official' and np.isfinite(m['mean_dice'])


def test_demo_checkpoints_and_wrong_layout(tmp_path):
    ck = make_demo_checkpoints(tmp_path, arch='micro', img_size3d=(16, 64, 64))
    net = build_model('segmentation', 3, 2, 'micro', (32, 96, 96), init='unimiss', checkpoint=ck['unimiss'])
    net2 = build_model('segmentation', 3, 2, 'micro', (32, 96, 96), init='official', checkpoint=ck['official'])
    torch.testing.assert_close(net.state_dict()['backbone.stages.0.pos_embed.3d'], net2.state_dict()['backbone.stages.0.pos_embed.3d'])
    with pytest.raises(ValueError, match="expected a checkpoint in the official layout"):
        build_model('segmentation', 3, 2, 'micro', (32, 96, 96), init='official', checkpoint=ck['unimiss'])
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        build_model('classification', 3, 2, 'micro', init='official', checkpoint=tmp_path / 'none.pth')


def test_ricord_official_list_paths(tmp_path):
    "The official lists name `data_nii_v0/...`; by default that folder is read as `RICORD_nii/` (datasets.md layout)."
    from unimiss.data import phantom_ct, write_nifti
    for i, (r, lab) in enumerate((('1A', 1), ('1B', 0))):
        write_nifti(tmp_path / 'RICORD_nii' / f'MIDRC-RICORD-{r}' / f'ID{i}.nii.gz', phantom_ct((32, 32, 16), i))
    lists = tmp_path / 'lists'; lists.mkdir()
    text = 'data_nii_v0/MIDRC-RICORD-1A/ID0.nii.gz 1\ndata_nii_v0/MIDRC-RICORD-1B/ID1.nii.gz 0\n'
    for s in ('train', 'val', 'test'): (lists / f'RICORD_{s}.txt').write_text(text)
    sp = ricord_cases(tmp_path)
    assert [(c['name'], c['label']) for c in sp['train']] == [('ID0', 1), ('ID1', 0)]
    assert sp['val'][0]['image'] == tmp_path / 'RICORD_nii' / 'MIDRC-RICORD-1A' / 'ID0.nii.gz'
    with pytest.raises(FileNotFoundError, match="case 'ID0'.*data_nii_v0"): ricord_cases(tmp_path, list_prefix=None)

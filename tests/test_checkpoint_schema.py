"""The versioned checkpoint schema of `unimiss.checkpoint`: every writer stamps it, files written before the version
field (version 0) still load everywhere, a file from a newer unimiss is refused by name (also by the CLI)."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from unimiss.checkpoint import (SCHEMA_VERSION, CheckpointVersionError, checkpoint_version, load_backbone, load_official,
                                read_checkpoint, save_checkpoint, select_network, to_official_checkpoint)
from unimiss.finetune import build_backbone, load_pretrained, make_demo_checkpoints
from unimiss.mit import MIT_ARCHS, MiT

REPO = Path(__file__).resolve().parents[1]


def _mit(seed=0, dims=(2, 3)):
    torch.manual_seed(seed)
    return MiT(spatial_dims=dims, img_size2d=64, img_size3d=(16, 64, 64), **MIT_ARCHS['tiny'])


def _same(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_writers_stamp_the_schema(tmp_path):
    ck = make_demo_checkpoints(tmp_path, 'tiny', img_size2d=64, img_size3d=(16, 64, 64))
    kinds = {name: read_checkpoint(ck[name]) for name in ('checkpoint', 'unimiss')}
    assert [(c['format'], c['schema_version'], c['kind']) for c in kinds.values()] == \
        [('unimiss', SCHEMA_VERSION, 'pretrain'), ('unimiss', SCHEMA_VERSION, 'backbone')]
    official = read_checkpoint(ck['official'])
    assert 'schema_version' not in official and checkpoint_version(official) == 0   # the authors' layout, unstamped
    # the three files hold the same teacher
    assert _same(load_backbone(ck['checkpoint']), load_backbone(ck['unimiss']))
    assert _same(load_backbone(ck['unimiss']), load_official(ck['official']))


def test_version_0_files_still_load(tmp_path):
    "Files as unimiss wrote them before the version field: pretraining, exported teacher, fine-tuning checkpoint."
    mit = _mit()
    net = {f'backbone.{k}': v for k, v in mit.state_dict().items()}
    cfg = dict(arch='tiny', img_size_2d=64, img_size_3d=[16, 64, 64])
    torch.save(dict(teacher=net, student=net, epoch=2, config=cfg), tmp_path / 'checkpoint.pth')
    torch.save(dict(state_dict=mit.state_dict(), config=cfg, epoch=2), tmp_path / 'teacher_backbone.pth')
    torch.save(dict(model={'w': torch.ones(2)}, epoch=1, metric={'auc': 0.5}, config={}), tmp_path / 'best.pt')
    for f in ('checkpoint.pth', 'teacher_backbone.pth', 'best.pt'):
        assert checkpoint_version(read_checkpoint(tmp_path / f)) == 0
    for f in ('checkpoint.pth', 'teacher_backbone.pth'):
        assert _same(load_backbone(tmp_path / f), mit)
        seg = build_backbone(3, 'tiny', (16, 64, 64))
        assert load_pretrained(seg, tmp_path / f)['missing'] == []
        assert torch.equal(seg.stages[2].blocks[0].mlp.fc1.weight, mit.stages[2].blocks[0].mlp.fc1.weight)
    assert read_checkpoint(tmp_path / 'best.pt', require=('model',))['epoch'] == 1


def test_newer_version_is_refused_by_name(tmp_path):
    p = save_checkpoint(dict(state_dict=_mit(dims=(2,)).state_dict()), tmp_path / 'new.pth', kind='backbone')
    torch.save(dict(read_checkpoint(p), schema_version=SCHEMA_VERSION + 1), p)
    for load in (read_checkpoint, load_backbone, lambda f: load_pretrained(build_backbone(2, 'micro', 64), f)):
        with pytest.raises(CheckpointVersionError, match=f"new.pth: checkpoint schema_version {SCHEMA_VERSION + 1} is newer"):
            load(p)
    r = subprocess.run([sys.executable, '-m', 'unimiss.checkpoint', str(p), str(tmp_path / 'out')],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 1 and 'Traceback' not in r.stderr and 'is newer than this unimiss reads' in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    torch.save(dict(schema_version='one', state_dict={}), tmp_path / 'bad.pth')
    with pytest.raises(ValueError, match="schema_version must be a non-negative integer, got 'one'"):
        read_checkpoint(tmp_path / 'bad.pth')


def test_one_selection_for_every_loader(tmp_path):
    "student/teacher picked the same way by `select_network`, `load_official`, `load_backbone` and `load_pretrained`."
    teacher, student = _mit(0, (2,)), _mit(1, (2,))   # 2D only: the selection does not depend on the modality
    path = save_checkpoint(to_official_checkpoint(teacher, {}, student, {}, epoch=3), tmp_path / 'official.pth', kind='official')
    assert all(k.startswith('module.') for k in read_checkpoint(path)['student'])
    for which, ref in (('teacher', teacher), ('student', student)):
        backbone, head = select_network(path, which)
        assert not head and not any(k.startswith(('module.', 'backbone.')) for k in backbone)
        assert _same(load_official(path, which), ref) and _same(load_backbone(path, which), ref)
        seg = build_backbone(2, 'tiny', 64)
        load_pretrained(seg, path, which)
        assert torch.equal(seg.stages[1].blocks[0].attn.q.weight, ref.stages[1].blocks[0].attn.q.weight)
    with pytest.raises(KeyError, match="no 'student' entry"):
        select_network(dict(teacher={'w': torch.ones(1)}), 'student')

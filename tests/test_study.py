"""`unimiss-experiments study` from a user's own weights (`--weights`, `--experiments`, `-f`, `--tag`, fractions like 0.1).

The fine-tuning tasks are stood in for by a toy notebook (`unimiss.experiments._toy_notebook(finetune=True)`) in a
checkout-like temporary folder, the weights by a random MiT-micro: the runs take seconds.
"""
import json, subprocess, sys
from pathlib import Path

import numpy as np
import pytest
import torch

from unimiss import experiments as ex
from unimiss.protocols import label_fraction_subset


@pytest.fixture
def checkout(tmp_path):
    "nbs/experiments/toyft.ipynb, configs/toyft_sample.yaml, two weight files and a runs folder."
    ex._toy_notebook(tmp_path/'nbs'/'experiments'/'toyft.ipynb', finetune=True)
    (tmp_path/'configs').mkdir()
    (tmp_path/'configs'/'toyft_sample.yaml').write_text('n: 40\n')
    (tmp_path/'big.yaml').write_text('n: 300\n')
    from unimiss.finetune import build_backbone
    for name, seed in (('a.pth', 0), ('b.pth', 1)):
        torch.manual_seed(seed)
        torch.save({'teacher': build_backbone(2, 'micro', 32).state_dict()}, tmp_path/name)
    return tmp_path


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, '-m', 'unimiss.experiments', 'study', *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


def test_study_from_weights(checkout):
    "Two weights, one fraction of 0.1: each its own cell; tags, files and the absolute weights path recorded per run."
    runs, nbs = checkout/'runs', checkout/'nbs'/'experiments'
    common = ['--runs-dir', runs, '--experiments-dir', nbs, '--experiments', 'toyft', '--no-fetch', '--fractions', '0.1',
              '--seeds', '0']
    r = _cli(*common, '--weights', 'a.pth', '--tag', 'mine', '-f', f'toyft={checkout}/big.yaml', cwd=checkout)
    assert r.returncode == 0, r.stderr[-2000:]
    tags = sorted(p.name for p in (runs/'toyft').iterdir())
    assert tags == ['mine-scratch-10pct-seed0', 'mine-unimiss-10pct-seed0']
    rec = json.loads((runs/'toyft'/'mine-unimiss-10pct-seed0'/'run.json').read_text())
    assert rec['params']['checkpoint'] == str((checkout/'a.pth').resolve())   # absolute: the same setting from any folder
    assert rec['params']['n'] == 300 and rec['params']['label_fraction'] == 0.1 and rec['params']['init'] == 'unimiss'
    assert not (runs/'pretrain').exists()   # no sample pretraining with --weights
    assert 'unimiss 10%' in r.stdout and 'scratch 10%' in r.stdout
    ex.study(runs, [0.1], inits=['unimiss'], seeds=[0], experiments=['toyft'], fetch=False, experiments_dir=nbs,
             weights=checkout/'b.pth', tag='other')
    summary = ex.summarize(ex.report_rows(ex.list_runs(runs)))
    pretrained = sorted(json.loads(s['setting'])[1]['checkpoint'] for s in summary if s['init'] == 'unimiss')
    assert pretrained == [str((checkout/n).resolve()) for n in ('a.pth', 'b.pth')]   # never averaged together
    assert len(summary) == 3
    assert 'other-' not in ex.report(runs, tag='mine*', write=False)


@pytest.mark.parametrize('args, message', [
    (['--weights', 'nope.pth'], 'nope.pth: no such file'),
    (['--weights', 'junk.pth'], 'junk.pth'),
    (['--weights', 'a.pth', '-f', 'missing.yaml'], 'missing.yaml does not exist'),
    (['--weights', 'a.pth', '-f', 'toyfx=big.yaml'], "'toyfx' is not one of this study's experiments"),
    (['--weights', 'a.pth', '--experiments', 'nothere'], "unknown experiment 'nothere'"),
    (['--weights', 'a.pth', '--fractions', '0'], 'label fractions must be in (0, 1]'),
    (['--weights', 'a.pth', '--tag', 'a/b'], 'tag'),
])
def test_study_refuses_bad_arguments(checkout, args, message, capsys, monkeypatch):
    "One line on stderr, exit status 2, nothing run."
    (checkout/'junk.pth').write_bytes(b'not a checkpoint')
    monkeypatch.chdir(checkout)
    runs = checkout/'runs'
    rc = ex.main(['study', '--runs-dir', str(runs), '--experiments-dir', str(checkout/'nbs'/'experiments'),
                  '--experiments', 'toyft', '--no-fetch', *args])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not runs.exists()


def test_study_cli_missing_weights(checkout):
    "The console command itself: one line, exit status 2."
    r = _cli('--runs-dir', checkout/'runs', '--no-fetch', '--weights', checkout/'gone.pth')
    assert r.returncode == 2 and r.stderr.startswith('error: weights ') and len(r.stderr.strip().splitlines()) == 1


def test_small_label_fractions_keep_every_class():
    "A stratified label fraction keeps at least one case of each class, however small the fraction."
    cases = [dict(name=str(i), label=int(i < 10)) for i in range(200)]   # 10 of class 1, 190 of class 0
    for f in (0.001, 0.01, 0.1):
        for seed in range(3):
            sub = label_fraction_subset(cases, f, seed, stratify=True)
            assert {c['label'] for c in sub} == {0, 1}
    assert sum(c['label'] for c in label_fraction_subset(cases, 0.1, 0, stratify=True)) == 1

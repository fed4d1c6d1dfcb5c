"""Integration tests of `unimiss.pretrain`: exact resume, 3D weights frozen in 2D epochs, atomic checkpoints,
non-finite loss, command line. Tiny model (`micro` MiT on 64-pixel inputs), 64 prototypes, synthetic data."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml

from unimiss.pretrain import (PretrainConfig, SyntheticViews, load_checkpoint, load_config, pretrain, read_log,
                              save_checkpoint)

TINY = dict(arch='micro', img_size_2d=64, img_size_3d=[16, 64, 64], out_dim=64, batch_size_2d=2, batch_size_3d=1,
            synthetic=2, num_workers=0, progress=False, warmup_epochs=1, interval=1, drop_path_rate=0.1, lr=5e-3)
REPO = Path(__file__).resolve().parents[1]


def tiny(tmp, **kw):
    return load_config(TINY | dict(output_dir=str(tmp)) | kw)


def assert_same_state(a, b, what):
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def assert_same_optimizer(a, b):
    assert a['param_groups'] == b['param_groups']
    assert a['state'].keys() == b['state'].keys()
    for i in a['state']:
        for k, v in a['state'][i].items():
            assert torch.equal(v, b['state'][i][k]), f"optimizer state {i}.{k} differs"


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
    "3 epochs (2D, 3D, 2D) in one go, and the same as 2 + resume + 1, keeping every epoch's checkpoint."
    root = tmp_path_factory.mktemp('resume')
    straight = pretrain(tiny(root/'straight', epochs=3))
    first = pretrain(tiny(root/'split', epochs=3, epochs_per_run=2, save_every=1))
    second = pretrain(tiny(root/'split', epochs=3, save_every=1))
    return root, straight, first, second


def test_resume_is_exact(runs):
    root, straight, first, second = runs
    assert (first['epoch'], first['finished']) == (2, False)
    assert (second['epoch'], second['finished']) == (3, True)
    a, b = load_checkpoint(straight['checkpoint']), load_checkpoint(second['checkpoint'])
    assert a['iteration'] == b['iteration'] == 4  # per epoch: 1 X-ray batch of 2, or 2 CT batches of 1
    for k in ('student', 'teacher', 'loss'):
        assert_same_state(a[k], b[k], k)
    assert_same_optimizer(a['optimizer'], b['optimizer'])
    # the log of the split run is the log of the straight run (up to wall-clock times)
    strip = lambda recs: [{k: v for k, v in r.items() if k not in ('time', 'seconds')} for r in recs]
    assert strip(read_log(straight['log'])) == strip(read_log(second['log']))


def test_training_moves_and_exports(runs):
    root, straight, *_ = runs
    ck = load_checkpoint(straight['checkpoint'])
    recs = [r for r in read_log(straight['log']) if r['type'] == 'iter']
    assert {r['dim'] for r in recs} == {2, 3}
    assert {'loss_vv', 'loss_vs', 'loss_ss', 'loss_sv', 'loss_2d'} <= {k for r in recs for k in r}
    assert set(straight['teacher']) == {'unimiss', 'official'}
    official = torch.load(straight['teacher']['official'], weights_only=True)
    assert any(k.startswith('backbone.') for k in official['teacher'])
    assert 'head.last_layer.weight_g' in official['teacher']
    assert ck['config']['epochs'] == 3 and ck['unimiss_version']


def test_2d_epoch_leaves_3d_weights_bit_identical(runs):
    "Epoch 3 is a 2D epoch: the 3D-only weights, their AdamW state and their teacher copies must not change."
    root, *_ = runs
    before, after = (load_checkpoint(root/'split'/f'checkpoint{n:04d}.pth') for n in (2, 3))
    assert after['epoch'] == 3
    from unimiss.pretrain import build_backbone
    cfg = PretrainConfig(**before['config'])
    names3d = [n for n, _ in build_backbone(cfg).dim_specific_parameters(3)]
    assert len(names3d) > 20
    for net in ('student', 'teacher'):
        for n in names3d:
            assert torch.equal(before[net][f'backbone.{n}'], after[net][f'backbone.{n}']), f"{net} {n} moved"
    # AdamW state is keyed by the parameter's position in `param_groups`; a fresh run has the same order
    from unimiss.pretrain import SelfDistillation
    sd = SelfDistillation(build_backbone(cfg), cfg)
    names = {id(p): n for n, p in sd.student.named_parameters()}
    flat = [names[id(p)] for g in sd.optimizer.param_groups for p in g['params']]
    idx3d = [i for i, n in enumerate(flat) if n.removeprefix('backbone.') in names3d]
    assert len(idx3d) == len(names3d) and all(i in before['optimizer']['state'] for i in idx3d)
    for i in idx3d:
        for k, v in before['optimizer']['state'][i].items():
            assert torch.equal(v, after['optimizer']['state'][i][k]), f"AdamW {k} of a 3D weight moved"
    # ... while the shared weights were trained
    assert not torch.equal(before['student']['head.mlp.0.weight'], after['student']['head.mlp.0.weight'])
    assert not torch.equal(before['teacher']['backbone.stages.3.blocks.0.mlp.fc1.weight'],
                           after['teacher']['backbone.stages.3.blocks.0.mlp.fc1.weight'])


class NaNInEpochs(SyntheticViews):
    "Synthetic views that are NaN in the epochs whose torch seed (set by `seed_epoch`) is in `bad_seeds`."
    def __init__(self, *a, bad_seeds=(), **k):
        super().__init__(*a, **k)
        self.bad_seeds = set(bad_seeds)

    def __getitem__(self, i):
        views = super().__getitem__(i)
        return [v * float('nan') for v in views] if torch.initial_seed() in self.bad_seeds else views


def test_nonfinite_loss_stops_and_keeps_checkpoint(tmp_path):
    cfg = tiny(tmp_path, epochs=3, use_3d=False, save_every=0)
    from unimiss.pretrain import _epoch_seed
    bad = NaNInEpochs(2, (3, 64, 64), bad_seeds=[_epoch_seed(cfg.seed, 0, 1)])
    with pytest.raises(FloatingPointError, match='non-finite loss.*epoch 1.*last good checkpoint'):
        pretrain(cfg, datasets={2: bad})
    ck = load_checkpoint(tmp_path/'checkpoint.pth')
    assert ck['epoch'] == 1
    assert all(torch.isfinite(v).all() for v in ck['teacher'].values())


KILL_SCRIPT = textwrap.dedent("""
    import sys, time, torch
    from unimiss.pretrain import save_checkpoint
    real = torch.save
    def slow_save(obj, f, *a, **k):
        f.write(b'x' * 1000); f.flush()
        print('writing', flush=True)
        time.sleep(60)
        real(obj, f, *a, **k)
    torch.save = slow_save
    save_checkpoint({'epoch': 2, 'w': torch.zeros(3)}, sys.argv[1])
""")


def test_kill_during_save_keeps_previous_checkpoint(tmp_path):
    path = tmp_path/'checkpoint.pth'
    save_checkpoint({'epoch': 1, 'w': torch.ones(3)}, path)
    proc = subprocess.Popen([sys.executable, '-c', KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == 'writing'
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None: proc.kill()
    ck = load_checkpoint(path)
    assert ck['epoch'] == 1 and torch.equal(ck['w'], torch.ones(3))
    # the next save cleans up the partial temporary file
    save_checkpoint({'epoch': 3}, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['checkpoint.pth']


def test_cli(tmp_path):
    cfg = tmp_path/'cfg.yaml'
    cfg.write_text(yaml.safe_dump(TINY | dict(epochs=2, use_3d=False, output_dir=str(tmp_path/'run'))))
    env = os.environ | dict(OMP_NUM_THREADS='1')
    r = subprocess.run([sys.executable, '-m', 'unimiss.pretrain', '--config', str(cfg), '--lr', '1e-3',
                        '--batch-size-2d', '1'], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ck = load_checkpoint(tmp_path/'run'/'checkpoint.pth')
    assert ck['config']['lr'] == 1e-3 and ck['config']['batch_size_2d'] == 1 and ck['iteration'] == 4
    assert (tmp_path/'run'/'teacher_official.pth').exists()
    assert yaml.safe_load((tmp_path/'run'/'config.yaml').read_text())['lr'] == 1e-3
    bad = subprocess.run([sys.executable, '-m', 'unimiss.pretrain', '--config', str(cfg), '--learning_rate', '1'],
                         capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert bad.returncode == 2 and "unknown pretraining config key(s): 'learning_rate'" in bad.stderr


def test_config_yaml_roundtrip(tmp_path):
    cfg = load_config(TINY)
    p = tmp_path/'c.yaml'
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    assert load_config(p) == cfg
    with pytest.raises(ValueError) as e:
        PretrainConfig(batch_size_3d=0, precision='16')
    assert 'batch_size_3d must be >= 1' in str(e.value) and 'precision must be one of' in str(e.value)


def test_tensorboard_optional(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match='pip install tensorboard'):
            pretrain(tiny(tmp_path, epochs=1, use_3d=False, tensorboard=True))
        return
    pretrain(tiny(tmp_path, epochs=1, use_3d=False, tensorboard=True))
    assert any((tmp_path/'tensorboard').iterdir())


def test_bf16_autocast_on_cpu(tmp_path):
    res = pretrain(tiny(tmp_path, epochs=1, use_2d=False, precision='bf16'))  # a CT epoch: 3D and slice paths
    ck = load_checkpoint(res['checkpoint'])
    assert all(v.dtype == torch.float32 for v in ck['teacher'].values())  # weights stay float32
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in read_log(res['log']))


def test_device_errors():
    from unimiss.pretrain import resolve_device
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match='CUDA is not available'):
            resolve_device('cuda')
    assert resolve_device('cpu') == torch.device('cpu')


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get('UNIMISS_COMPILE_TESTS'), reason="compiling takes minutes on the CPU (over 8 on a "
                    "shared 2-core machine): set UNIMISS_COMPILE_TESTS=1 to run it")
def test_compile_matches_eager(tmp_path):
    """`compile=True` (inductor on the transformer blocks): the losses of a 2D and a 3D epoch agree with eager to float32
    rounding (stochastic depth on: the compiled blocks draw from torch's generator), with a few static graphs."""
    from torch._dynamo.utils import counters
    torch._dynamo.reset(); counters.clear()
    logs = {}
    for compile in (False, True):
        res = pretrain(tiny(tmp_path/str(compile), epochs=2, log_every=1, compile=compile))  # a 2D, then a 3D epoch
        logs[compile] = [r for r in read_log(res['log']) if r['type'] == 'iter']
    assert [r['iteration'] for r in logs[True]] == [r['iteration'] for r in logs[False]] == [0, 1, 2]
    for a, b in zip(logs[False], logs[True]):
        assert b['loss'] == pytest.approx(a['loss'], rel=1e-5), (a['iteration'], a['loss'], b['loss'])
    # one graph per block (7 in the micro MiT) and path: 2D student + teacher, 3D volumes + slices, the teacher's
    # CLS-only last block, with and without gradients
    graphs = counters['stats']['unique_graphs']
    assert 0 < graphs <= 8 * 7, graphs
    torch._dynamo.reset()

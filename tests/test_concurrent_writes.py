"Two runs writing into one folder at once: one's sweep of stale temporaries must not delete the other's file in flight."
import subprocess, sys, textwrap, time
from pathlib import Path

from unimiss.data import remove_stale_temps


def test_sweep_leaves_a_running_writers_temporary(tmp_path):
    go = tmp_path/'started'
    writer = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from unimiss.data import atomic_write
        def slow(tmp):
            tmp.write_text('half'); Path({str(go)!r}).touch(); time.sleep(3); tmp.write_text('whole')
        atomic_write(Path({str(tmp_path)!r})/'list.txt', slow)
    """)
    p = subprocess.Popen([sys.executable, '-c', writer])
    try:
        for _ in range(600):
            if go.exists() or p.poll() is not None: break
            time.sleep(0.05)
        assert go.exists(), 'the writer did not start'
        (tmp_path/'.old.txt.tmp-abcd1234.txt').write_text('left by a killed run')
        removed = [q.name for q in remove_stale_temps(tmp_path)]
        assert removed == ['.old.txt.tmp-abcd1234.txt']  # the killed run's, not the live writer's
    finally: rc = p.wait(timeout=60)
    assert rc == 0 and (tmp_path/'list.txt').read_text() == 'whole'
    assert not [q for q in Path(tmp_path).iterdir() if '.tmp' in q.name]

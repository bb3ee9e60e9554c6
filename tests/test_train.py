"Training: resume after SIGKILL, bad settings from the command line, the adapter that `train` writes."
import json, os, re, signal, subprocess, sys, time
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
LORA_NB = str(Path(sys.executable).parent/'lora-nb')
ENV = {**os.environ, 'LORA_NB_PROFILE': 'fast'}


def _train_cmd(out, name, steps, *extra):
    return [LORA_NB, 'train', '--name', name, '--set', f'train.output_dir={out}', '--set', f'train.max_steps={steps}',
            '--set', 'train.save_steps=4', '--set', 'train.eval_steps=0', '--set', 'train.logging_steps=1',
            '--set', 'lora.dropout=0', '--set', 'train.save_total_limit=0', *extra]


def _losses(run):
    hist = json.loads((run/'metrics.json').read_text())['log_history']
    return {h['step']: h['loss'] for h in hist if 'loss' in h}


def test_resume_after_sigkill(tmp_path):
    steps = 24
    # the reference: one uninterrupted run
    subprocess.run(_train_cmd(tmp_path, 'ref', steps), env=ENV, check=True, capture_output=True)
    ref = _losses(tmp_path/'ref')
    # the same run, killed with SIGKILL once a mid-run checkpoint exists
    p = subprocess.Popen(_train_cmd(tmp_path, 'killed', steps), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run = tmp_path/'killed'
    deadline = time.time() + 120
    while not (run/'checkpoint-8'/'trainer_state.json').exists():
        assert p.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "no checkpoint-8 within 120 s"
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    assert not (run/'metrics.json').exists(), "the run finished before the kill: nothing was tested"
    r = subprocess.run(_train_cmd(tmp_path, 'killed', steps, '--resume'), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((run/'metrics.json').read_text())
    assert m['steps'] == steps
    assert int(m['resumed_from'].split('-')[-1]) >= 8, m['resumed_from']
    # the loss curve continues where it stopped: every step logged once, and equal to the uninterrupted run's
    resumed = _losses(run)
    assert sorted(resumed) == list(range(1, steps + 1))
    for s in resumed:
        assert resumed[s] == pytest.approx(ref[s], abs=1e-3), (s, resumed[s], ref[s])


def test_train_refuses_to_overwrite_a_run(tmp_path):
    subprocess.run(_train_cmd(tmp_path, 'once', 4), env=ENV, check=True, capture_output=True)
    r = subprocess.run(_train_cmd(tmp_path, 'once', 4), env=ENV, capture_output=True, text=True)
    assert r.returncode == 1 and 'already holds checkpoints' in r.stderr and 'Traceback' not in r.stderr


@pytest.mark.parametrize('setting, message', [
    ('lora.target_modules=q_proj,qkv', 'qkv matches no linear layer'),
    ('train.batch_size=0', "'0' must be > 0"),
    ('lora.dropout=1.5', "'1.5' must be in [0, 1)"),
    ('train.optimizer=sgd', "unknown key 'optimizer'"),
])
def test_bad_settings_fail_in_one_line(tmp_path, setting, message):
    r = subprocess.run(_train_cmd(tmp_path, 'bad', 2, '--set', setting), env=ENV, capture_output=True, text=True)
    assert r.returncode == 1, r.stderr[-2000:]
    assert message in r.stderr and 'Traceback' not in r.stderr, r.stderr[-2000:]


def test_trained_adapter_loads_and_changes_generations(tmp_path):
    from lora_nb.config import load_config
    from lora_nb.infer import generate_responses
    from lora_nb.adapters import load_for_inference
    from lora_nb.data import read_records
    subprocess.run(_train_cmd(tmp_path, 'gen', 8, '--set', 'train.lr=1e-2'), env=ENV, check=True, capture_output=True)
    cfg = load_config(profile='fast')
    recs = read_records(str(ROOT/'data'/'tickets_test.jsonl'))[:4]
    base, tok = load_for_inference(cfg=cfg)
    tuned, _ = load_for_inference(adapter=tmp_path/'gen'/'adapter', cfg=cfg)
    from peft import PeftModel
    assert isinstance(tuned, PeftModel)
    before = generate_responses(base, tok, recs, max_new_tokens=8)
    after = generate_responses(tuned, tok, recs, max_new_tokens=8)
    assert before != after


def test_console_shows_one_aligned_line_per_log_and_the_monitor_reports(tmp_path):
    "`lora-nb train` prints a header and one line per logging step (no dict reprs); the monitor's record is in metrics.json"
    r = subprocess.run(_train_cmd(tmp_path, 'lines', 4, '--set', 'train.eval_steps=2'), env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    header = next(i for i, l in enumerate(lines) if l.split() == ['step', 'loss', 'eval', 'loss', 'lr', 'grad', 'norm', 'tok/s', 'left'])
    rows = [l for l in lines[header + 1:] if re.match(r'\s+\d+/4 ', l)]
    assert [l.split()[0] for l in rows if l.split()[1] != '-'] == ['1/4', '2/4', '3/4', '4/4']
    assert len({len(l) for l in rows}) == 1 and len(rows[0]) == len(lines[header]), "columns not aligned"
    assert "{'loss'" not in r.stdout + r.stderr and "'learning_rate'" not in r.stdout + r.stderr
    m = json.loads((tmp_path/'lines'/'metrics.json').read_text())
    assert m['monitor_findings'] == [] and m['world_size'] == 1
    scalars = [p.name for p in (tmp_path/'lines'/'tb').rglob('events.out.tfevents.*')]
    assert scalars, "no TensorBoard event files"

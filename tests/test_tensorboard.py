"""TensorBoard reads every run: a tiny training run's scalars, served by TensorBoard itself over HTTP, are exactly
what the trainer logged (its log history in metrics.json) and what the event files hold.

The run uses the fast profile (tiny model, a few steps) and writes into a temporary folder.
"""
from __future__ import annotations
import json, time, urllib.parse
from pathlib import Path

import pytest

from conftest import free_port, get_json, record_timing, require, start_server, stop_process, venv_tool, wait_for_http

# TensorBoard tag (what transformers' TensorBoardCallback writes: train/<key>, eval/<key without eval_>)
# -> key in the trainer's log history
TAGS = {'train/loss': 'loss', 'eval/loss': 'eval_loss', 'train/learning_rate': 'learning_rate',
        'train/grad_norm': 'grad_norm', 'train/tokens_per_sec': 'tokens_per_sec'}


def expected_points(log_history: list) -> dict:
    "{tag: [(step, value), ...]} as the trainer logged them"
    return {tag: [(h['step'], float(h[key])) for h in log_history if key in h] for tag, key in TAGS.items()}


@pytest.fixture(scope='module')
def tiny_run(tmp_path_factory):
    "A fast-profile training run (tiny model) in a temporary output folder; returns the run folder"
    from lora_nb.train import train
    from lora_nb.config import load_config
    out = tmp_path_factory.mktemp('runs')
    cfg = load_config(profile='fast', overrides=[f'train.output_dir={out}'])
    t0 = time.time()
    run_dir = train(cfg, name='tb-check', plot=False)
    record_timing('tensorboard', 'tiny training run', time.time() - t0)
    return Path(run_dir)


@pytest.fixture(scope='module')
def tensorboard(tiny_run, tmp_path_factory):
    "TensorBoard serving the run folder on 127.0.0.1; yields its base URL"
    exe = venv_tool('tensorboard')
    require(exe, 'tensorboard is not installed in the venv')
    port, log = free_port(), tmp_path_factory.mktemp('tb') / 'tensorboard.log'
    proc = start_server([str(exe), '--logdir', str(tiny_run), '--host', '127.0.0.1', '--port', str(port)],
                        None, log)
    url = f'http://127.0.0.1:{port}'
    try:
        record_timing('tensorboard', 'server start', wait_for_http(f'{url}/data/runs', proc, log))
        yield url
    finally:
        stop_process(proc)


def served_points(url: str, tags: list, timeout: float = 60) -> tuple[str, dict]:
    "(run, {tag: [(step, value), ...]}) read through TensorBoard's scalars API, once every tag has loaded"
    t0, seen = time.time(), {}
    while time.time() - t0 < timeout:
        seen = get_json(f'{url}/data/plugin/scalars/tags')
        runs = [r for r, t in seen.items() if all(tag in t for tag in tags)]
        if runs:
            run = runs[0]
            q = lambda tag: urllib.parse.urlencode(dict(run=run, tag=tag))
            return run, {tag: [(s, v) for _, s, v in get_json(f'{url}/data/plugin/scalars/scalars?{q(tag)}')]
                         for tag in tags}
        time.sleep(1)
    pytest.fail(f'TensorBoard did not serve all of {tags} within {timeout:.0f} s; it serves {seen}')


def event_file_points(run_dir: Path, tags: list) -> dict:
    "{tag: [(step, value), ...]} read from the event files with TensorBoard's EventAccumulator"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir), size_guidance={'scalars': 0}).Reload()
    have = acc.Tags()['scalars']
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] if tag in have else [] for tag in tags}


def assert_same_points(got: dict, want: dict, what: str):
    for tag, pts in want.items():
        g = got.get(tag, [])
        assert [s for s, _ in g] == [s for s, _ in pts], f"{what}, {tag}: steps {[s for s, _ in g]}, expected {[s for s, _ in pts]}"
        for (s, v), (_, w) in zip(g, pts):  # event files store float32
            assert v == pytest.approx(w, rel=1e-6, abs=1e-7), f"{what}, {tag} at step {s}: {v} != {w}"


def test_tensorboard_serves_every_logged_scalar(tiny_run, tensorboard):
    metrics = json.loads((tiny_run / 'metrics.json').read_text())
    want = expected_points(metrics['log_history'])
    steps = metrics['steps']
    # the fast profile logs every step and evaluates every few steps: nothing may be missing from the history
    assert len(want['train/loss']) == steps, f"{steps} steps but {len(want['train/loss'])} train losses logged"
    assert want['eval/loss'], 'no eval loss logged'
    for tag, pts in want.items(): assert pts, f"nothing logged for {tag} ({TAGS[tag]})"
    assert all(v > 0 for _, v in want['train/tokens_per_sec'])

    events = event_file_points(tiny_run / 'tb', list(TAGS))
    assert_same_points(events, want, 'event files vs metrics.json')
    run, served = served_points(tensorboard, list(TAGS))
    assert_same_points(served, want, f'TensorBoard (run {run!r}) vs metrics.json')
    print({tag: len(p) for tag, p in served.items()})


def test_monitor_scalars_are_in_the_run(tiny_run):
    "`train` attaches the TrainingMonitor by default: its split gradient norms sit beside the Trainer's scalars"
    from lora_nb.monitors import read_scalars
    tags = set(read_scalars(tiny_run))
    assert {'monitor/grad_norm_attention', 'monitor/grad_norm_mlp', 'monitor/update_ratio_mlp'} <= tags, sorted(tags)

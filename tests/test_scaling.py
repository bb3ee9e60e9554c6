"""Scaling out: 2 processes, 2 (simulated) machines and DeepSpeed ZeRO-3 train what 1 process trains; a killed worker
stops the job in bounded time and --resume finishes it; the launches that would silently train otherwise are refused.

Tiny model, CPU, gloo, one thread per process. The 1-process reference run is shared by the equality tests."""
import json, os, signal, subprocess, sys, time
from pathlib import Path

import pytest

from conftest import ROOT, free_port

BIN = Path(sys.executable).parent
LORA_NB, TORCHRUN, ACCELERATE = str(BIN/'lora-nb'), str(BIN/'torchrun'), str(BIN/'accelerate')
ENV = {**os.environ, 'LORA_NB_PROFILE': 'fast', 'OMP_NUM_THREADS': '1'}
PROCESSES_2 = ['--processes', '2']
TOL = 1e-4


def settings(out, *extra):
    "--set arguments: 6 fp32 steps without dropout, a checkpoint every 3, large lr (so the weights move), into `out`"
    kv = ['train.max_steps=6', 'train.eval_steps=0', 'train.save_steps=3', 'train.logging_steps=1', 'lora.dropout=0',
          'train.precision=fp32', 'train.lr=1e-2', f'train.output_dir={out}', *extra]
    return [a for s in kv for a in ('--set', s)]


def run(cmd, timeout=300, **kw):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, **kw)
    return r


def metrics(run_dir):
    return json.loads((Path(run_dir)/'metrics.json').read_text())


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    "One process, batch 4"
    out = tmp_path_factory.mktemp('ref')
    r = run([LORA_NB, 'train', '--name', 'one', *settings(out, 'train.batch_size=4')])
    assert r.returncode == 0, r.stderr[-3000:]
    return out/'one'


def assert_equal_to(reference, run_dir, world_size=2):
    from lora_nb.scaling import compare_runs
    d = compare_runs(reference, run_dir)
    assert d['steps'] == 6 and d['max_lora_B'] > 100 * TOL, d  # training moved the adapter far beyond the tolerance
    assert d['max_loss_diff'] < TOL and d['max_weight_diff'] < TOL, d
    m = metrics(run_dir)
    assert m['world_size'] == world_size, m['world_size']
    return d, m


def test_two_processes_equal_one(reference, tmp_path):
    t0 = time.time()
    r = run([LORA_NB, 'train', *PROCESSES_2, '--name', 'two', *settings(tmp_path, 'train.batch_size=2')])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'DDP over gloo, 2 processes' in r.stdout
    d, m = assert_equal_to(reference, tmp_path/'two')
    assert (m['distributed'], m['backend'], m['rank_weight_max_diff']) == ('DDP', 'gloo', 0.0)  # both ranks identical
    # only rank 0 wrote: TensorBoard files of one process (the Trainer's and the monitor's), one printed result,
    # no staging left behind
    events = list((tmp_path/'two'/'tb').glob('events.out.tfevents.*'))
    assert events and len({f.name.split('.')[-2] for f in events}) == 1, events  # ...tfevents.<time>.<host>.<pid>.<n>
    assert r.stdout.count('run folder:') == 1 and not (tmp_path/'two'/'.staging').exists()
    print(f"2 processes: {time.time() - t0:.1f} s, {d}")


def test_two_machines_equal_one(reference, tmp_path):
    "Two torchrun launchers (--nnodes 2, one process each) meeting on a loopback rendezvous endpoint"
    endpoint = f'127.0.0.1:{free_port()}'
    cmd = lambda node: [TORCHRUN, '--nnodes', '2', '--node-rank', str(node), '--nproc-per-node', '1', '--rdzv-endpoint', endpoint,
                        '--no-python', LORA_NB, 'train', '--name', 'nodes', *settings(tmp_path, 'train.batch_size=2')]
    machines = [subprocess.Popen(cmd(n), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    outs = [p.communicate(timeout=300) for p in machines]
    assert [p.returncode for p in machines] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert 'DDP over gloo, 2 processes on 2 machines' in outs[0][0] and 'DDP over gloo' not in outs[1][0]  # rank 0 prints
    assert 'run folder:' in outs[0][0] and 'run folder:' not in outs[1][0]
    d, m = assert_equal_to(reference, tmp_path/'nodes')
    assert (m['machines'], m['rank_weight_max_diff']) == (2, 0.0)


def test_zero3_equal_one_and_adapter_complete(reference, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from lora_nb.models import load_base
    r = run([LORA_NB, 'train', *PROCESSES_2, '--name', 'z3', *settings(tmp_path, 'train.batch_size=2', 'train.deepspeed=zero3')])
    assert r.returncode == 0, r.stderr[-3000:]
    assert 'DeepSpeed ZeRO-3 over gloo, 2 processes' in r.stdout
    d, m = assert_equal_to(reference, tmp_path/'z3')  # compare_runs also refuses adapters with other tensors or shapes
    assert (m['distributed'], m['zero_stage']) == ('DeepSpeed ZeRO-3', 3)
    saved = load_file(str(tmp_path/'z3'/'adapter'/'adapter_model.safetensors'))
    ref = load_file(str(reference/'adapter'/'adapter_model.safetensors'))
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in ref.items()}
    # the checkpoint the Trainer saved under ZeRO-3 is complete too
    ckpt = load_file(str(tmp_path/'z3'/'checkpoint-6'/'adapter_model.safetensors'))
    assert all(torch.equal(ckpt[k], saved[k]) for k in saved)
    # the adapter loads, and the loaded weights are the trained ones
    base, _ = load_base('tiny')
    model = PeftModel.from_pretrained(base, str(tmp_path/'z3'/'adapter'))
    loaded = {n: p for n, p in model.named_parameters() if 'lora_' in n}
    assert len(loaded) == len(saved)
    for k, v in saved.items():
        name = k.replace('.weight', '.default.weight')
        assert torch.equal(loaded[name].detach(), v), k


def _worker_pid(launcher_pid, rank, timeout=120):
    import psutil
    deadline = time.time() + timeout
    while time.time() < deadline:
        for c in psutil.Process(launcher_pid).children(recursive=True):
            try:
                if c.environ().get('RANK') == str(rank): return c.pid
            except psutil.Error: pass
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under pid {launcher_pid}")


def test_killed_worker_stops_job_and_resume_finishes(tmp_path):
    steps = ['train.max_steps=30', 'train.save_steps=4', 'train.batch_size=2']
    cmd = [LORA_NB, 'train', *PROCESSES_2, '--name', 'k', *settings(tmp_path, *steps)]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path/'k'
    deadline = time.time() + 180
    while not (run_dir/'checkpoint-4'/'trainer_state.json').exists():
        assert job.poll() is None, job.communicate()[1][-3000:]
        assert time.time() < deadline, "no checkpoint-4 within 180 s"
        time.sleep(0.05)
    os.kill(_worker_pid(job.pid, 1), signal.SIGKILL)
    t0 = time.time()
    out, err = job.communicate(timeout=60)
    stopped_in = time.time() - t0
    assert job.returncode != 0
    assert 'worker rank 1' in err and 'SIGKILL' in err and '--resume' in err, err[-3000:]
    assert not (run_dir/'metrics.json').exists(), "the run finished before the kill: nothing was tested"
    assert stopped_in < 30, f"the job took {stopped_in:.1f} s to stop"
    r = run([*cmd, '--resume'])
    assert r.returncode == 0, r.stderr[-3000:]
    m = metrics(run_dir)
    assert m['steps'] == 30 and int(m['resumed_from'].split('-')[-1]) >= 4 and m['world_size'] == 2
    from lora_nb.scaling import step_losses
    assert sorted(step_losses(run_dir)) == list(range(1, 31))  # every step logged once, across the kill
    print(f"job stopped {stopped_in:.1f} s after the kill; resumed from {m['resumed_from']}")


@pytest.mark.slow
def test_stuck_worker_stops_job_after_ddp_timeout(tmp_path):
    "A worker that hangs (SIGSTOP) instead of dying: the others time out in the all-reduce after ddp_timeout"
    cmd = [LORA_NB, 'train', *PROCESSES_2, '--name', 'hang',
           *settings(tmp_path, 'train.max_steps=40', 'train.save_steps=4', 'train.batch_size=2', 'train.ddp_timeout=10')]
    job = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 180
    while not (tmp_path/'hang'/'checkpoint-4'/'trainer_state.json').exists():
        assert job.poll() is None and time.time() < deadline, "no checkpoint-4"
        time.sleep(0.05)
    stuck = _worker_pid(job.pid, 1)
    os.kill(stuck, signal.SIGSTOP)
    t0 = time.time()
    try: out, err = job.communicate(timeout=120)
    finally:
        try: os.kill(stuck, signal.SIGKILL)
        except ProcessLookupError: pass
    stopped_in = time.time() - t0
    assert job.returncode != 0 and 'Timed out' in err and 'worker rank' in err, err[-3000:]
    assert stopped_in < 10 + 45, f"{stopped_in:.0f} s"  # the timeout, then the launcher's grace period for the stopped worker
    print(f"job stopped {stopped_in:.1f} s after the worker hung (ddp_timeout 10 s)")


# ---- the silent fallbacks: each reproduced, then refused

PROBE = """import os, sys, json
seen = {k: os.environ.get(k) for k in ('WORLD_SIZE', 'ACCELERATE_USE_FSDP')}
if len(sys.argv) > 1:
    from accelerate import PartialState
    s = PartialState(cpu=sys.argv[1] == 'use_cpu')
    seen.update(processes=s.num_processes, mode=s.distributed_type.value)
os.write(1, f'PROBE {json.dumps(seen)}\\n'.encode())
"""

FSDP_USE_CPU_FALSE = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_machines: 1
num_processes: 2
use_cpu: false
mixed_precision: 'no'
fsdp_config:
  fsdp_sharding_strategy: FULL_SHARD
"""

TRAPS = {  # launcher arguments, probe argument, what the processes see, the refusal
    'cpu flag': (['--cpu', '--num_processes', '2'], [], lambda seen: len(seen) == 1, 'starts ONE process'),
    'fsdp on cpu': (['--use_fsdp', '--num_processes', '2'], ['use_cpu'],
                    lambda seen: [(s['processes'], s['mode']) for s in seen] == [(2, 'MULTI_CPU')] * 2, 'FSDP needs CUDA GPUs'),
    'fsdp use_cpu false': (['--config_file', 'FSDP_YAML'], ['no_cpu'],
                           lambda seen: [(s['WORLD_SIZE'], s['processes'], s['mode']) for s in seen] == [('2', 1, 'NO')] * 2,
                           'FSDP needs CUDA GPUs'),
}


@pytest.fixture(scope='module')
def trap_runs(tmp_path_factory):
    "Every trap launched twice, all at once (they are independent; mostly Python start-up): the probe, then lora-nb train"
    tmp = tmp_path_factory.mktemp('traps')
    (tmp/'fsdp.yaml').write_text(FSDP_USE_CPU_FALSE)
    (tmp/'probe.py').write_text(PROBE)
    def accelerate(trap, *args):
        launch = [str(tmp/'fsdp.yaml') if a == 'FSDP_YAML' else a for a in TRAPS[trap][0]]
        return [ACCELERATE, 'launch', '--main_process_port', str(free_port()), *launch, *args]
    cmds = {}
    for i, trap in enumerate(TRAPS):
        cmds[trap, 'probe'] = accelerate(trap, str(tmp/'probe.py'), *TRAPS[trap][1])
        cmds[trap, 'train'] = accelerate(trap, '--no_python', LORA_NB, 'train', '--name', 'trap', *settings(tmp/str(i)))
    cmds['deepspeed', 'train'] = [LORA_NB, 'train', '--name', 'ds1', *settings(tmp/'ds', 'train.deepspeed=zero2')]
    procs = {k: subprocess.Popen(c, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for k, c in cmds.items()}
    outs = {k: p.communicate(timeout=300) for k, p in procs.items()}
    return tmp, {k: (procs[k].returncode, *outs[k]) for k in cmds}


@pytest.mark.parametrize('trap', list(TRAPS))
def test_silent_fallback_reproduced_and_refused(trap, trap_runs):
    tmp, runs = trap_runs
    # the trap: the launch runs, and the processes are not the job that was asked for
    code, out, err = runs[trap, 'probe']
    seen = [json.loads(l.split(' ', 1)[1]) for l in out.splitlines() if l.startswith('PROBE ')]
    assert code == 0 and TRAPS[trap][2](seen), (seen, err[-2000:])
    # lora-nb refuses it, with its message, before training
    code, out, err = runs[trap, 'train']
    assert code != 0 and TRAPS[trap][3] in err, err[-3000:]
    assert not (tmp/str(list(TRAPS).index(trap))/'trap').exists()  # refused before anything was written


def test_world_problems_on_the_trap_values():
    "What check_world says for the third trap's values (WORLD_SIZE=2, accelerate: one process, NO), and when all is well"
    from lora_nb.distributed import world_problems
    assert 'each process would train alone' in world_problems(2, 1, 'NO')[0]
    assert world_problems(2, 2, 'MULTI_CPU') == [] and world_problems(1, 1, 'NO') == []
    assert 'train.deepspeed = zero3 but training runs DDP' in world_problems(2, 2, 'MULTI_CPU', 0, 3)[0]


def test_train_alone_does_not_start_processes(tmp_path):
    "train() runs in the process that calls it: asked for 2 processes without a launcher, it refuses before loading"
    from lora_nb.config import load_config
    from lora_nb.distributed import ScalingError
    from lora_nb.train import train
    cfg = load_config(overrides=['train.processes=2', f'train.output_dir={tmp_path}'])
    with pytest.raises(ScalingError, match='lora_nb.scaling.launch_training'): train(cfg, name='alone')
    assert not (tmp_path/'alone').exists()


def test_deepspeed_on_one_process_is_refused(trap_runs):
    tmp, runs = trap_runs
    code, out, err = runs['deepspeed', 'train']
    assert code == 1 and 'this is one process' in err and 'Traceback' not in err, err[-3000:]
    assert not (tmp/'ds'/'ds1').exists()  # refused before anything was written

"The `lora-nb` command end to end on the tiny model: train -> eval -> merge -> export, and its error paths."
import json, os, subprocess, sys
from pathlib import Path
import pytest

LORA_NB = str(Path(sys.executable).parent/'lora-nb')
ENV = {**os.environ, 'LORA_NB_PROFILE': 'fast'}


def run(*args):
    r = subprocess.run([LORA_NB, *map(str, args)], env=ENV, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


@pytest.fixture(scope='module')
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    code, stdout, err = run('train', '--name', 'cli', '--set', f'train.output_dir={out}', '--set', 'train.eval_steps=0')
    assert code == 0, err[-3000:]
    assert f'run folder: {out/"cli"}' in stdout
    return out/'cli'/'adapter'


def test_eval_prints_table_then_json(adapter, tmp_path):
    code, out, err = run('eval', '--adapter', adapter, '--limit', 5, '--output', tmp_path/'m.json')
    assert code == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert {'n', 'json_valid', 'intent', 'order_id', 'urgent', 'exact_match'} <= set(last) and last['n'] == 5
    assert all(0 <= last[k] <= 1 for k in ('json_valid', 'intent', 'order_id', 'urgent', 'exact_match'))
    assert json.loads((tmp_path/'m.json').read_text())['n'] == 5
    assert 'exact_match' in out.splitlines()[-3] or any(l.startswith('exact_match') for l in out.splitlines())


def test_eval_zero_shot_base(tmp_path):
    code, out, err = run('eval', '--base', 'tiny', '--limit', 3)
    assert code == 0, err[-3000:]
    assert json.loads(out.strip().splitlines()[-1])['n'] == 3


def test_merge_then_export(adapter, tmp_path):
    code, out, err = run('merge', '--adapter', adapter, '--output', tmp_path/'merged')
    assert code == 0, err[-3000:]
    assert (tmp_path/'merged'/'config.json').exists()
    code, out, err = run('export', '--model', tmp_path/'merged', '--output', tmp_path/'m.gguf', '--dtype', 'f32', '--ollama')
    assert code == 0, err[-3000:]
    assert (tmp_path/'m.gguf').stat().st_size > 0 and (tmp_path/'Modelfile').exists()
    code, out, err = run('export', '--adapter', adapter, '--output', tmp_path/'lora.gguf')
    assert code == 0, err[-3000:]
    assert (tmp_path/'lora.gguf').exists()


@pytest.mark.parametrize('args, code, message', [
    (('eval', '--adapter', '/no/such/adapter'), 1, 'no adapter_config.json'),
    (('merge', '--adapter', 'x'), 2, 'the following arguments are required: --output'),
    (('export', '--output', 'x.gguf'), 1, 'give exactly one of --model MERGED_DIR or --adapter DIR'),
    (('train', '--set', 'data.train_file=/no/such.jsonl'), 1, '/no/such.jsonl'),
    (('frobnicate',), 2, "invalid choice: 'frobnicate'"),
])
def test_errors_are_one_line(args, code, message):
    got, out, err = run(*args)
    assert got == code, err[-3000:]
    assert message in err and 'Traceback' not in err, err[-3000:]


@pytest.mark.parametrize('cmd', ['train', 'eval', 'chat', 'demo', 'merge', 'export', 'bench', 'estimate', 'doctor', 'tensorboard'])
def test_every_subcommand_has_help(cmd):
    code, out, err = run(cmd, '--help')
    assert code == 0 and 'usage: lora-nb' in out


def test_chat_answers_one_message(adapter):
    code, out, err = run('chat', '--adapter', adapter, '--instruction',
                         'Triage this support ticket. Reply with JSON: intent, order_id, urgent.', '-m', 'Where is order 12345?')
    assert code == 0 and 'Traceback' not in err, err[-3000:]
    assert out.endswith('\n')  # one answer printed (the tiny random model's text itself can be anything)


def test_doctor_clean_and_faulty():
    code, out, err = run('doctor')
    assert code == 0, out + err[-2000:]
    code, out, err = run('doctor', '--set', 'lora.target_modules=q_proj,qkv')
    assert code == 1 and 'qkv' in out + err, out + err[-2000:]


@pytest.mark.parametrize('extra', [(), ('--set', 'quant.load_in_4bit=true')], ids=['lora', 'qlora'])
def test_demo_before_after(extra, tmp_path):
    "`lora-nb demo` (the tiny model in the fast profile): zero-shot, training, the table, demo.json; also in 4-bit"
    code, out, err = run('demo', '--set', f'train.output_dir={tmp_path}', '--set', 'eval.limit=4', *extra)
    assert code == 0, err[-3000:]
    assert '== 1/3 zero-shot' in out and '== 3/3 fine-tuned' in out and 'demo finished in' in out.splitlines()[-1]
    result = json.loads(next(tmp_path.glob('*/demo.json')).read_text())
    assert result['before']['n'] == result['after']['n'] == 4
    assert result['settings']['load_in_4bit'] == bool(extra) and result['machine']['torch_threads'] >= 1
    assert ('4-bit NF4' in out) == bool(extra)


def test_bench_smoke(tmp_path):
    "`lora-nb bench` on the tiny model: every recipe runs and the last line is the JSON summary (no timing asserted)"
    code, out, err = run('bench', '--model', 'tiny', '--steps', 2, '--examples', 8, '--batch-size', 2, '--output', tmp_path/'b.json')
    assert code == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last == json.loads((tmp_path/'b.json').read_text())
    assert sorted(last['recipes']) == ['lora_fp32', 'lora_nb', 'qlora', 'qlora_no_gc', 'seed', 'trl']
    assert all(last[k] is not None for k in ('speedup_vs_seed_recipe', 'speedup_vs_trl_default', 'roofline_fraction', 'qlora_to_lora_memory'))

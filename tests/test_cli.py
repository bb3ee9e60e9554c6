"The `lora-nb` command end to end on the tiny model: train -> eval -> merge -> export, its error paths, and a quiet console."
import json, os, subprocess, sys
from pathlib import Path
import pytest

LORA_NB = str(Path(sys.executable).parent/'lora-nb')
ENV = {**os.environ, 'LORA_NB_PROFILE': 'fast'}


def run(*args):
    r = subprocess.run([LORA_NB, *map(str, args)], env=ENV, capture_output=True, text=True)
    return r.returncode, r.stdout, r.stderr


def noise(err: str) -> list[str]:
    "The lines on stderr that are not our own progress bars (tqdm redraws with \\r)"
    return [l for l in err.replace('\r', '\n').splitlines() if l.strip() and not l.startswith('generating:')]


@pytest.fixture(scope='module')
def adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp('runs')
    code, stdout, err = run('train', '--name', 'cli', '--set', f'train.output_dir={out}', '--set', 'train.eval_steps=0')
    assert code == 0, err[-3000:]
    assert f'run folder: {out/"cli"}' in stdout
    assert not noise(err), err[-3000:]  # no library warnings (DeepSpeed's accelerator line, ...) on the console
    return out/'cli'/'adapter'


def test_eval_prints_table_then_json(adapter, tmp_path):
    "With an adapter: the base alone and base + adapter side by side; the JSON line has the adapter's figures, the base's under 'before'"
    code, out, err = run('eval', '--adapter', adapter, '--limit', 5, '--output', tmp_path/'m.json')
    assert code == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    keys = {'n', 'loss', 'perplexity', 'json_valid', 'intent', 'order_id', 'urgent', 'exact_match'}
    assert keys <= set(last) and last['n'] == 5
    assert keys <= set(last['before']) and last['before']['n'] == 5 and 'before' not in last['before']
    assert all(0 <= m[k] <= 1 for m in (last, last['before']) for k in ('json_valid', 'intent', 'order_id', 'urgent', 'exact_match'))
    assert last['loss'] != last['before']['loss']  # the adapter was switched off for the base column, and on for the other
    assert json.loads((tmp_path/'m.json').read_text())['before']['n'] == 5
    lines = out.splitlines()
    assert lines[0].split() == ['base', 'base', '+', 'adapter']
    row = next(l for l in lines if l.startswith('exact_match')).split()
    assert [float(x) for x in row[1:]] == [round(last['before']['exact_match'], 3), round(last['exact_match'], 3)]
    code, out, err = run('eval', '--adapter', adapter, '--limit', 2, '--no-base', '--output', tmp_path/'m2.json')
    assert code == 0 and out.splitlines()[0].split() == ['base', '+', 'adapter'], err[-3000:]
    assert 'before' not in json.loads(out.strip().splitlines()[-1])


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
    code, out, err = run('export', '--adapter', adapter, '--output', tmp_path/'lora-ours.gguf', '--converter', 'lora_nb')
    assert code == 0, err[-3000:]
    assert (tmp_path/'lora-ours.gguf').exists()


@pytest.mark.parametrize('args, code, message', [
    (('eval', '--adapter', '/no/such/adapter'), 1, 'lora-nb eval: error: /no/such/adapter: no such adapter folder'),
    (('merge', '--adapter', 'x'), 2, 'the following arguments are required: --output'),
    (('export', '--output', 'x.gguf'), 2, 'one of the arguments --model --adapter is required'),
    (('export', '--model', 'm', '--adapter', 'a', '--output', 'x.gguf'), 2, 'not allowed with argument'),
    (('train', '--set', 'data.train_file=/no/such.jsonl'), 1, '/no/such.jsonl'),
    (('data', 'check', '/no/such.jsonl'), 1, 'lora-nb data check: error: /no/such.jsonl: file not found'),
    (('data',), 2, 'the following arguments are required: ACTION'),
    (('frobnicate',), 2, "invalid choice: 'frobnicate'"),
])
def test_errors_are_one_line(args, code, message):
    got, out, err = run(*args)
    assert got == code, err[-3000:]
    assert message in err and 'Traceback' not in err, err[-3000:]


@pytest.mark.parametrize('cmd', ['train', 'eval', 'chat', 'data', 'data show', 'data check', 'demo', 'merge', 'export', 'bench',
                                 'estimate', 'doctor', 'tensorboard'])
def test_every_subcommand_has_help(cmd):
    code, out, err = run(*cmd.split(), '--help')
    assert code == 0 and 'usage: lora-nb' in out


def test_other_template_is_a_warning(adapter):
    "The adapter trained on Alpaca prompts, asked in the chat template: eval and chat say so before answering"
    for args in (('eval', '--adapter', adapter, '--limit', 1, '--no-base', '--output', adapter.parent/'chat-eval.json'),
                 ('chat', '--adapter', adapter, '-m', 'Where is order 12345?')):
        code, out, err = run(*args, '--set', 'data.template=chat')
        assert code == 0, err[-3000:]
        assert "was trained on 'alpaca' prompts, but these settings build 'chat' prompts" in err, err[-3000:]
        assert 'fix: --set data.template=alpaca' in err
    code, out, err = run('chat', '--adapter', adapter, '-m', 'Where is order 12345?')
    assert 'was trained on' not in err


def test_chat_answers_one_message(adapter):
    code, out, err = run('chat', '--adapter', adapter, '--instruction',
                         'Triage this support ticket. Reply with JSON: intent, order_id, urgent.', '-m', 'Where is order 12345?')
    assert code == 0 and 'Traceback' not in err, err[-3000:]
    assert out.endswith('\n')  # one answer printed (the tiny random model's text itself can be anything)
    assert 'template=alpaca: each message is answered on its own' in err  # and it says there is no conversation


def test_chat_keeps_the_history():
    "template=chat: the second prompt is the first one, the model's first answer and the second message"
    code, out, err = run('chat', '--base', 'tiny', '--set', 'data.template=chat', '--show-prompt',
                         '-m', 'Where is order 12345?', '-m', 'And order 67890?')
    assert code == 0, err[-3000:]
    first, second = [p.strip('\n') for p in err.split('--- prompt ---\n')[1:]]
    assert first.endswith('<|im_start|>user\nWhere is order 12345?<|im_end|>\n<|im_start|>assistant')
    assert second.startswith(first) and second.endswith('<|im_start|>user\nAnd order 67890?<|im_end|>\n<|im_start|>assistant')
    answer = second[len(first):].split('<|im_end|>')[0].strip()   # the first answer, as the second prompt holds it
    assert out.startswith(answer + '\n')
    assert 'template=alpaca' not in err


def test_chat_reads_lines_until_the_end_of_input():
    r = subprocess.run([LORA_NB, 'chat', '--base', 'tiny', '--set', 'data.template=chat', '--show-prompt'], input='Hi\n\nWhere is 12345?\n',
                       env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    prompts = r.stderr.split('--- prompt ---\n')[1:]
    assert len(prompts) == 2 and 'Hi<|im_end|>' in prompts[1] and prompts[1].rstrip().endswith('Where is 12345?<|im_end|>\n<|im_start|>assistant')


# --- a user's data file: show, check, doctor -------------------------------------------------------------------------

@pytest.fixture(scope='module')
def chats(tmp_path_factory):
    "A conversations file with a misspelled role (line 2), a conversation without an answer (line 3) and a duplicate (line 4)"
    turns = lambda *t: [dict(role=r, content=c) for r, c in t]
    recs = [turns(('user', 'Where is order 58392?'), ('assistant', 'It ships today.')),
            turns(('user', 'Hi'), ('asistant', 'Hello')),
            turns(('system', 'Be brief.'), ('user', 'Hi')),
            turns(('user', 'Where is order 58392?'), ('assistant', 'It ships today.'))]
    d = tmp_path_factory.mktemp('chats')
    (d/'bad.jsonl').write_text(''.join(json.dumps(dict(messages=m)) + '\n' for m in recs))
    (d/'good.jsonl').write_text(''.join(json.dumps(dict(messages=m)) + '\n' for m in recs[:1]))
    return d


def test_data_show_marks_what_trains(chats):
    code, out, err = run('data', 'show', chats/'bad.jsonl', '--n', 2)
    assert code == 0, err[-3000:]
    assert out.count('── ') == 2 and '⟦It ships today.<|im_end|>⟧' in out and '\x1b[' not in out  # not a terminal: markers
    assert "  problem: messages[1]: role 'asistant' is not one of system, user, assistant" in out.splitlines()
    code, out, err = run('data', 'show', chats/'good.jsonl', '--color', 'always')
    assert code == 0 and '\x1b[1;42;30mIt ships today.<|im_end|>\x1b[0m' in out and '⟦' not in out, err[-3000:]


def test_data_check_counts_and_exits_1_on_errors(chats):
    code, out, err = run('data', 'check', chats/'bad.jsonl')
    assert code == 1, out + err[-3000:]
    lines = out.splitlines()
    assert "  line 2, messages[1]: role 'asistant' is not one of system, user, assistant" in lines
    assert 'duplicates: 1, without an assistant turn: 1, role errors: 1' in lines and '3 error(s):' in lines
    code, out, err = run('data', 'check', chats/'good.jsonl', '--json', '--set', 'data.max_length=43')
    report = json.loads(out)
    assert code == 0 and report['ok'] and report['formats'] == {'conversations': 1}, err[-3000:]
    assert report['max_length'] == 43 and report['truncated'] == 1 and 0 < report['supervised_lost'] < report['supervised_tokens']


def test_doctor_on_a_file(chats):
    code, out, err = run('doctor', '--data', chats/'bad.jsonl')
    assert code == 1 and "[error] records: 3 problem(s)" in out and "role 'asistant'" in out, out + err[-2000:]


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
    assert not noise(err), err[-3000:]


def test_bench_recipes_subset_and_unknown_recipe(tmp_path):
    "`lora-nb bench` on the tiny model: the recipes asked for run, the last line is the JSON summary, also saved"
    # every recipe of the bench, and the summary's figures, are checked through run_bench in tests/test_bench.py
    code, out, err = run('bench', '--model', 'tiny', '--steps', 2, '--examples', 4, '--batch-size', 2, '--recipes', 'lora_nb,lora_nb_chat',
                         '--output', tmp_path/'b.json')
    assert code == 0, err[-3000:]
    last = json.loads(out.strip().splitlines()[-1])
    assert last == json.loads((tmp_path/'b.json').read_text())
    assert sorted(last['recipes']) == ['lora_nb', 'lora_nb_chat'] and last['chat_to_instruction_tokens_per_sec'] is not None
    code, out, err = run('bench', '--model', 'tiny', '--recipes', 'lora_nb,unsloth')
    assert code == 1 and err.strip().splitlines() == ["lora-nb bench: error: recipe(s) 'unsloth': use seed, trl, lora_nb, lora_nb_chat, "
                                                      "lora_fp32, qlora, qlora_no_gc"], err[-3000:]


# --- an adapter on the wrong base: one line from every subcommand that takes an adapter --------------------------

SHARED_SHAPE = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
                'num_key_value_heads', 'head_dim', 'tie_word_embeddings', 'bos_token_id', 'eos_token_id', 'pad_token_id')


@pytest.fixture(scope='module')
def wrong_base(tmp_path_factory):
    "{kind: (adapter, what the error must say)} for two adapters the tiny Llama is the wrong base for"
    from transformers import AutoModelForCausalLM, Qwen3Config
    from lora_nb.models import attach_lora, load_tokenizer, tiny_config
    d = tmp_path_factory.mktemp('wrong-base')
    narrow = AutoModelForCausalLM.from_config(tiny_config(hidden_size=32, head_dim=8))  # other shapes
    narrow.name_or_path = 'tiny-narrow'
    attach_lora(narrow, r=4, alpha=8).save_pretrained(d/'narrow', save_embedding_layers=False)
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**{k: getattr(tiny_config(), k) for k in SHARED_SHAPE}))  # same shapes
    qwen3.save_pretrained(d/'tiny-qwen3'); load_tokenizer('tiny').save_pretrained(d/'tiny-qwen3')
    qwen3.name_or_path = str(d/'tiny-qwen3')
    attach_lora(qwen3, r=4, alpha=8).save_pretrained(d/'qwen3', save_embedding_layers=False)
    return {'shapes': (d/'narrow', ['does not fit this base (LlamaForCausalLM, hidden size 64, 2 layers)', "trained on 'tiny-narrow'"]),
            'architecture': (d/'qwen3', [f"trained on '{d/'tiny-qwen3'}' (Qwen3ForCausalLM), but the base given is", '(LlamaForCausalLM)'])}


WRONG_BASE_RUNS = {
    'eval': lambda a, out: ('eval', '--adapter', a, '--base', 'tiny', '--limit', 1, '--output', out/'eval.json'),
    'chat': lambda a, out: ('chat', '--adapter', a, '--base', 'tiny', '-m', 'Where is order 12345?'),
    'merge': lambda a, out: ('merge', '--adapter', a, '--base', 'tiny', '--output', out/'merged'),
    'export': lambda a, out: ('export', '--adapter', a, '--base', 'tiny', '--output', out/'lora.gguf'),
}


@pytest.mark.parametrize('kind', ['shapes', 'architecture'])
@pytest.mark.parametrize('cmd', list(WRONG_BASE_RUNS))
def test_wrong_base_is_one_line(wrong_base, cmd, kind, tmp_path):
    adapter, says = wrong_base[kind]
    code, out, err = run(*WRONG_BASE_RUNS[cmd](adapter, tmp_path))
    assert code == 1, err[-3000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f'lora-nb {cmd}: error: {adapter}/'), err[-3000:]
    assert all(s in lines[0] for s in says), lines[0]
    assert out == '' and not any(tmp_path.iterdir()), "a refused adapter printed or wrote something"

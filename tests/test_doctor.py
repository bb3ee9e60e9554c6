"The doctor (lora_nb.doctor, nbs/10_doctor.ipynb): every check fires on the faulty situation it is about, and not on a clean setup."
import pytest
import torch

from lora_nb.config import load_config, save_config
from lora_nb.data import collate_padded, load_splits
from lora_nb.doctor import (SYMPTOMS, check_batches, check_data, check_memory, check_model, check_optimization,
                            check_precision, check_template, diagnose, format_findings)
from lora_nb.models import attach_lora, load_base, load_tokenizer
from lora_nb.monitors import Finding, has_errors


@pytest.fixture(scope='module')
def cfg(): return load_config(profile='fast')

@pytest.fixture(scope='module')
def tok(cfg): return load_tokenizer(cfg.model.name)

@pytest.fixture(scope='module')
def records(cfg): return load_splits(cfg.data)['train'][:64]

def fast(*overrides): return load_config(profile='fast', overrides=list(overrides))

def checks(findings): return sorted(f.check for f in findings)


def test_clean_setup_has_no_findings(cfg, tok, records):
    assert diagnose(cfg, tokenizer=tok, records=records) == []


@pytest.mark.parametrize('overrides, expected', [
    (['train.lr=5e-2'], 'learning-rate'), (['train.lr=2e-3'], 'learning-rate'), (['train.lr=1e-7'], 'learning-rate'),
    (['train.warmup=0'], 'warmup'), (['lora.r=4', 'lora.alpha=64'], 'lora-scaling'), (['lora.r=128', 'lora.alpha=16'], 'lora-scaling')])
def test_optimization_checks(overrides, expected):
    assert checks(check_optimization(fast(*overrides))) == [expected]

def test_learning_rate_severity():
    assert [f.severity for f in check_optimization(fast('train.lr=5e-2'))] == ['error']
    assert [f.severity for f in check_optimization(fast('train.lr=2e-3'))] == ['warning']

def test_rslora_scaling_uses_sqrt_r():
    assert check_optimization(fast('lora.r=64', 'lora.alpha=16', 'lora.use_rslora=true')) == []  # 16/8 = 2


def test_fp16_on_cpu():
    if torch.cuda.is_available(): pytest.skip('CPU check')
    assert checks(check_precision(fast('train.precision=fp16'))) == ['precision']
    assert checks(check_precision(fast('model.dtype=float16'))) == ['precision']

def test_missing_device():
    if torch.cuda.is_available(): pytest.skip('needs a machine without CUDA')
    assert checks(check_precision(fast('model.device=cuda'))) == ['device']

def test_4bit_where_bitsandbytes_cannot_run(monkeypatch):
    import lora_nb.doctor as d
    monkeypatch.setattr(d, 'bnb_4bit_problem', lambda device: 'no 4-bit kernels for this device')
    found = check_precision(fast('quant.load_in_4bit=true'))
    assert checks(found) == ['quantization'] and has_errors(found) and 'no 4-bit kernels' in found[0].evidence


def test_truncation_share(tok, records):
    found = check_data(fast('data.max_length=112'), tok, records)
    assert checks(found) == ['truncation'] and '%' in found[0].evidence

def test_truncation_reports_the_share_of_supervised_tokens_lost(tok, records):
    "Conversations cut by max_length: the finding gives the share of supervised tokens lost, the figure data_report computes"
    from lora_nb.data import data_report
    chats = [dict(messages=[dict(role='user', content=r['input']), dict(role='assistant', content=r['output'])]) for r in records[:40]]
    rep = data_report(chats, tok, max_length=96)
    assert 0 < rep['supervised_lost'] < rep['supervised_tokens']
    found = [f for f in diagnose(fast('data.max_length=96'), tokenizer=tok, records=chats) if f.check == 'truncation']
    assert len(found) == 1 and found[0].severity == 'warning'
    assert f"{rep['supervised_lost']:,} of {rep['supervised_tokens']:,} supervised tokens ({rep['supervised_lost_share']:.1%})" in found[0].evidence

def test_conversation_answers_past_max_length_leave_nothing_to_learn(tok):
    chat = [dict(messages=[dict(role='user', content='word ' * 60), dict(role='assistant', content='ok')])]
    found = check_data(fast('data.max_length=48'), tok, chat)
    assert checks(found) == ['supervised-tokens', 'truncation'] and 'past max_length=48' in found[0].evidence
    assert '(100.0%)' in found[1].evidence

def test_prompt_longer_than_max_length(tok, records):
    assert 'supervised-tokens' in checks(check_data(fast('data.max_length=40'), tok, records))

def test_invalid_records(cfg, tok, records):
    bad = [dict(instruction='Do it', input='', output='')] + list(records[:3])
    assert checks(check_data(cfg, tok, bad)) == ['records']


def eos_as_pad_collator(tok):
    "The classic bug: pad with EOS, then mask every pad-token id in the labels (EOS included)"
    def collate(examples):
        ids = collate_padded(examples, tok.pad_token_id)['input_ids']
        labels = ids.clone(); labels[ids == tok.pad_token_id] = -100
        return dict(input_ids=ids, labels=labels)
    return collate

def test_eos_masked_and_prompt_unmasked(cfg, tok, records):
    found = check_batches(cfg, tok, records, eos_as_pad_collator(tok))
    assert checks(found) == ['eos-masked', 'prompt-masking']
    assert 'pad token = EOS' in found[0].evidence

def test_hf_language_modeling_collator(cfg, tok, records):
    from transformers import DataCollatorForLanguageModeling
    assert checks(check_batches(cfg, tok, records, DataCollatorForLanguageModeling(tok, mlm=False))) == ['eos-masked', 'prompt-masking']

def test_batch_without_supervised_tokens(cfg, tok, records):
    def nothing(examples):
        b = collate_padded(examples, tok.pad_token_id); b['labels'][:] = -100; return b
    assert 'supervised-tokens' in checks(check_batches(cfg, tok, records, nothing))

def test_padding_waste(cfg, tok, records):
    pad512 = lambda ex: collate_padded(ex, tok.pad_token_id, pad_to_multiple_of=512)
    found = check_batches(cfg, tok, records, pad512)
    assert checks(found) == ['padding-waste'] and found[0].fix == '--set data.batching=padding_free'


@pytest.fixture(scope='module')
def base():
    return lambda: load_base('tiny')[0]

def test_no_trainable_parameters(cfg, base):
    assert checks(check_model(cfg, attach_lora(base()).requires_grad_(False))) == ['trainable-params']

def test_target_that_matches_nothing(cfg, base):
    from peft import LoraConfig, get_peft_model
    m = get_peft_model(base(), LoraConfig(r=4, target_modules=['q_proj', 'qkv_proj'], task_type='CAUSAL_LM'))
    found = check_model(cfg, m)
    assert checks(found) == ['lora-targets'] and 'qkv_proj' in found[0].evidence

def test_target_error_when_doctor_builds_the_model(tok, records):
    found = diagnose(fast('lora.target_modules=q_proj,query_key_value'), tokenizer=tok, records=records)
    assert checks(found) == ['lora-targets'] and has_errors(found)

def test_attention_only_for_a_large_dataset(cfg, base):
    m = attach_lora(base(), target_modules='q_proj,v_proj')
    assert check_model(cfg, m, n_examples=500) == []
    assert checks(check_model(cfg, m, n_examples=5000)) == ['lora-coverage']


def test_template_and_base_model_mismatch(cfg, tok, tmp_path):
    save_config(cfg, tmp_path/'config.ini')
    assert check_template(cfg, tok, tmp_path/'adapter') == []
    assert checks(check_template(fast('data.template=chat'), tok, tmp_path)) == ['prompt-template']
    assert checks(check_template(fast('model.name=smollm2-135m'), tok, tmp_path)) == ['base-model']

def test_chat_template_missing(cfg, tok):
    class NoChat: chat_template = None
    assert checks(check_template(fast('data.template=chat'), NoChat())) == ['prompt-template']


def test_memory_does_not_fit(cfg):
    assert check_memory(cfg) == []
    assert checks(check_memory(cfg, available=10_000_000)) == ['memory']


def test_format_and_symptoms():
    fs = [Finding('warning', 'padding-waste', '80% padding', '--set data.batching=padding_free'),
          Finding('error', 'eos-masked', 'EOS masked', 'fix it')]
    text = format_findings(fs)
    assert text.splitlines()[0] == '1 error, 1 warning' and text.index('eos-masked') < text.index('padding-waste')
    assert 'explains: Slow training' in text
    named = {c for s in SYMPTOMS for c in s['checks']}
    assert {'eos-masked', 'prompt-template', 'memory', 'overfitting', 'padding-waste'} <= named


def test_unreadable_training_data(tok):
    found = diagnose(fast('data.train_file=data/no_such_file.jsonl', 'data.val_file='), tokenizer=tok)
    assert checks(found) == ['records'] and has_errors(found)


def test_doctor_reads_data_by_the_path_rule_not_the_current_folder(tok, tmp_path, monkeypatch):
    "The doctor and train read the same files: relative data paths are resolved against the project root"
    (tmp_path/'data').mkdir()
    (tmp_path/'data'/'tickets_train.jsonl').write_text('not json\n')  # what a current-folder fallback would read
    (tmp_path/'data'/'only_here.jsonl').write_text('{"instruction": "a", "output": "b"}\n')
    monkeypatch.chdir(tmp_path)
    assert 'records' not in checks(diagnose(fast(), tokenizer=tok))
    found = diagnose(fast('data.train_file=data/only_here.jsonl', 'data.val_file='), tokenizer=tok)
    assert checks(found) == ['records'] and 'file not found' in found[0].evidence

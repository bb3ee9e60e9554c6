"The doctor (lora_nb.diagnostics): every check fires on the faulty situation it is about, and not on a clean setup."
import math

import pytest
import torch

from lora_nb.config import load_config, save_config
from lora_nb.data import collate_padded, load_splits
from lora_nb.diagnostics import (SYMPTOMS, Finding, TrainingDiverged, TrainingMonitor, check_batches, check_data,
                                 check_log_history, check_memory, check_model, check_optimization, check_precision,
                                 check_template, diagnose, find_overfitting, format_findings, has_errors,
                                 history_from_scalars, loss_plateau, read_scalars)
from lora_nb.models import attach_lora, load_base, load_tokenizer


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
    import lora_nb.diagnostics as d
    monkeypatch.setattr(d, 'bnb_4bit_problem', lambda device: 'no 4-bit kernels for this device')
    found = check_precision(fast('quant.load_in_4bit=true'))
    assert checks(found) == ['quantization'] and has_errors(found) and 'no 4-bit kernels' in found[0].evidence


def test_truncation_share(tok, records):
    found = check_data(fast('data.max_length=112'), tok, records)
    assert checks(found) == ['truncation'] and '%' in found[0].evidence

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


def test_log_history_checks():
    falling = [{'step': s, 'loss': 2.0 * 0.99 ** s} for s in range(1, 101)]
    evals = [{'step': s, 'eval_loss': 1.0 + 1e-5 * (s - 40) ** 2} for s in range(20, 101, 20)]
    o = find_overfitting(falling + evals)
    assert o['step'] == 40 and o['last_train_loss'] < o['train_loss_at_best']
    assert checks(check_log_history(falling + evals)) == ['overfitting']
    flat = [{'step': s, 'loss': 2.5} for s in range(1, 30)]
    assert checks(check_log_history(flat)) == ['loss-plateau']
    assert loss_plateau([(s, 2.5) for s in range(1, 10)]) is None  # not enough steps to tell
    assert checks(check_log_history([{'step': 1, 'loss': 2.0}, {'step': 2, 'loss': math.nan}])) == ['nan-loss']
    rising_train = [{'step': s, 'loss': 1.0 + s / 100} for s in range(1, 101)]
    assert find_overfitting(rising_train + evals) is None  # both rising: not overfitting


def test_monitor_stops_on_nan_and_warns_on_plateau():
    from transformers import TrainerControl, TrainerState, TrainingArguments
    args, control, mon = TrainingArguments(output_dir='/tmp/unused', report_to='none', use_cpu=True), TrainerControl(), TrainingMonitor(plateau_steps=10)
    state = TrainerState()
    with pytest.warns(UserWarning, match='loss has stayed at'):
        for step in range(1, 12):
            state.global_step = step
            mon.on_log(args, state, control, logs={'loss': 2.5, 'learning_rate': 1e-4, 'grad_norm': 1.0})
    assert len(mon.warnings) == 1 and len(mon.history) == 11
    state.global_step = 12
    with pytest.raises(TrainingDiverged, match='step 12: the loss is inf'):
        mon.on_log(args, state, control, logs={'loss': math.inf})


def test_tensorboard_round_trip(tmp_path):
    from torch.utils.tensorboard import SummaryWriter
    w = SummaryWriter(str(tmp_path/'tb'))
    for s in range(1, 6): w.add_scalar('train/loss', 3.0 - 0.1 * s, s)
    w.add_scalar('eval/loss', 2.9, 5); w.close()
    hist = history_from_scalars(read_scalars(tmp_path))
    assert [h['step'] for h in hist if 'loss' in h] == [1, 2, 3, 4, 5]
    assert [(h['step'], round(h['eval_loss'], 4)) for h in hist if 'eval_loss' in h] == [(5, 2.9)]


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

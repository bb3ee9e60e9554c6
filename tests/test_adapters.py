"Adapters: refusing a wrong base or a damaged file, switching adapters, merging (fp32, bf16, from 4-bit)."
import json, os, shutil, warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config

from lora_nb.adapters import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MERGE_TOLERANCE, AdapterError, OtherBaseWarning,
                              check_records, combine_adapters, load_adapter, load_for_inference, logit_gap,
                              merge_adapter, prompt_logits, read_adapter_weights, save_adapter, task_overrides,
                              using_adapter)
from lora_nb.config import load_config
from lora_nb.infer import generate_responses
from lora_nb.models import attach_lora, load_base, load_tokenizer, resolve_model, tiny_checkpoint, tiny_config
from lora_nb.tasks import TASKS as SHIPPED_TASKS

TASKS = ('tickets', 'summary')  # the tasks the adapters here are trained on


@pytest.fixture(scope='module')
def adapters(tmp_path_factory):
    "A tiny adapter per shipped task, trained by `train` (6 steps at lr 1e-2: enough to leave a mark)"
    from lora_nb.train import train
    out = tmp_path_factory.mktemp('runs')
    ov = [f'train.output_dir={out}', 'train.lr=1e-2', 'train.save_steps=0', 'train.eval_steps=0']
    return {t: train(load_config(profile='fast', overrides=[*task_overrides(t), *ov]), name=t, plot=False)/'adapter'
            for t in TASKS}


def tiny():
    return load_base('tiny', training=False)[0]


def copy(src, tmp_path, name='copy') -> Path:
    return Path(shutil.copytree(src, tmp_path/name))


def has_lora(model) -> bool:
    return any('lora_' in n for n, _ in model.named_modules())


# --- wrong base --------------------------------------------------------------------------------------------------

def test_wrong_hidden_size(adapters):
    wider = AutoModelForCausalLM.from_config(tiny_config(hidden_size=96, head_dim=24))
    with pytest.raises(AdapterError) as e:
        load_adapter(wider, adapters['tickets'])
    msg = str(e.value)
    assert str(adapters['tickets']/ADAPTER_WEIGHTS) in msg
    assert 'hidden size 96' in msg and 'has shape (64, 16)' in msg and 'needs (96, 16)' in msg and "trained on 'tiny'" in msg
    assert not has_lora(wider), "the refused adapter left LoRA layers in the base"


def test_tiny_adapter_onto_smollm2_architecture(adapters):
    # SmolLM2's real architecture, on the meta device (shapes only, no weights): the check needs nothing more
    config = AutoConfig.from_pretrained(resolve_model('smollm2-135m'))
    with torch.device('meta'):
        smol = AutoModelForCausalLM.from_config(config)
    with pytest.raises(AdapterError, match=r'hidden size 576, 30 layers\).*needs \(16, 1536\)'):
        load_adapter(smol, adapters['tickets'])


def test_adapter_with_layers_the_base_lacks(tmp_path):
    four = AutoModelForCausalLM.from_config(tiny_config(num_hidden_layers=4))
    attach_lora(four, r=4, alpha=8).save_pretrained(tmp_path/'four', save_embedding_layers=False)
    base = tiny()
    with pytest.raises(AdapterError, match=r'holds weights for 14 module\(s\) this base .* does not have, e.g. model.layers.2'):
        load_adapter(base, tmp_path/'four')
    assert not has_lora(base)


def test_other_architecture_of_the_same_shapes(tmp_path):
    "A Qwen3 adapter fits the tiny Llama's shapes exactly; its recorded base says Qwen3, so it is refused, naming both"
    shape = ('vocab_size', 'hidden_size', 'intermediate_size', 'num_hidden_layers', 'num_attention_heads',
             'num_key_value_heads', 'head_dim', 'tie_word_embeddings')
    qwen3 = AutoModelForCausalLM.from_config(Qwen3Config(**{k: getattr(tiny_config(), k) for k in shape}))
    qwen3.save_pretrained(tmp_path/'tiny-qwen3'); load_tokenizer('tiny').save_pretrained(tmp_path/'tiny-qwen3')
    own_base = load_base(str(tmp_path/'tiny-qwen3'), training=False)[0]
    attach_lora(own_base, r=4, alpha=8).save_pretrained(tmp_path/'adapter', save_embedding_layers=False)
    base = tiny()
    with pytest.raises(AdapterError, match=r"trained on '.*tiny-qwen3' \(Qwen3ForCausalLM\), but the base given is 'tiny' \(LlamaForCausalLM\)"):
        load_adapter(base, tmp_path/'adapter')
    assert not has_lora(base)
    with warnings.catch_warnings():
        warnings.simplefilter('error', OtherBaseWarning)  # on the base it names: no error and no warning
        load_adapter(load_base(str(tmp_path/'tiny-qwen3'), training=False)[0], tmp_path/'adapter')


def test_other_base_name_warns(adapters):
    with pytest.warns(OtherBaseWarning, match=r"trained on 'tiny', put on '.*seed1'"):
        model = load_adapter(load_base(str(tiny_checkpoint(seed=1)), training=False)[0], adapters['tickets'])
    assert list(model.peft_config) == ['default']  # a warning, not a refusal
    with warnings.catch_warnings():
        warnings.simplefilter('error', OtherBaseWarning)  # the built-in name's own folder is the same base
        load_adapter(load_base(resolve_model('tiny'), training=False)[0], adapters['tickets'])


def test_load_for_inference_checks(adapters):
    model, tok = load_for_inference(adapter=adapters['summary'], cfg=load_config(profile='fast'))
    assert model.name_or_path == 'tiny' and not model.training
    with pytest.raises(AdapterError, match='does not fit this base'):
        load_for_inference('smollm2-135m', adapters['summary'], load_config(profile='fast'))


# --- damaged files ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('keep', [0, 5, 100, 'half', -1])
def test_truncated_weights(adapters, tmp_path, keep):
    d = copy(adapters['tickets'], tmp_path)
    p = d/ADAPTER_WEIGHTS
    size = p.stat().st_size
    n = {'half': size // 2, -1: size - 1}.get(keep, keep)
    os.truncate(p, n)
    base = tiny()
    with pytest.raises(AdapterError, match='truncated|too short') as e:
        load_adapter(base, d)
    assert str(p) in str(e.value)
    assert not has_lora(base)


def test_trailing_bytes(adapters, tmp_path):
    d = copy(adapters['tickets'], tmp_path)
    with open(d/ADAPTER_WEIGHTS, 'ab') as f: f.write(b'\0' * 10)
    with pytest.raises(AdapterError, match='has trailing bytes'):
        read_adapter_weights(d)


@pytest.mark.parametrize('damage, message', [
    (lambda t: t[:len(t) // 2], 'not valid JSON (line'),
    (lambda t: '', 'not valid JSON (line 1, column 1'),
    (lambda t: '[1, 2]', 'expected a JSON object'),
    (lambda t: t.replace('"LORA"', '"IA3"'), "peft_type is 'IA3', not 'LORA'"),
    (lambda t: json.dumps({k: v for k, v in json.loads(t).items() if k != 'r'}), "missing field(s) r"),
])
def test_damaged_config(adapters, tmp_path, damage, message):
    d = copy(adapters['tickets'], tmp_path)
    p = d/ADAPTER_CONFIG
    p.write_text(damage(p.read_text()))
    with pytest.raises(AdapterError) as e:
        load_adapter(tiny(), d)
    assert str(p) in str(e.value) and message in str(e.value)


def test_missing_files(adapters, tmp_path):
    d = copy(adapters['tickets'], tmp_path)
    (d/ADAPTER_WEIGHTS).unlink()
    with pytest.raises(AdapterError, match=f'{ADAPTER_WEIGHTS}: missing'):
        load_adapter(tiny(), d)
    with pytest.raises(AdapterError, match='no such adapter folder'):
        load_adapter(tiny(), tmp_path/'nowhere')


def test_missing_tensor_is_an_error_and_the_load_is_undone(adapters, tmp_path):
    d = copy(adapters['tickets'], tmp_path)
    w = load_file(d/ADAPTER_WEIGHTS)
    dropped = 'base_model.model.model.layers.1.mlp.down_proj.lora_B.weight'
    save_file({k: v for k, v in w.items() if k != dropped}, d/ADAPTER_WEIGHTS)
    base = tiny()
    with pytest.raises(AdapterError, match=f'has no weights for 1 of the 28 tensors .* e.g. {dropped}'):
        load_adapter(base, d)
    assert not has_lora(base), "PEFT's half-done load was not undone"
    # the same on a model that already carries an adapter: the bad one is removed, the good one stays
    model = load_adapter(tiny(), adapters['summary'], name='summary')
    with pytest.raises(AdapterError):
        load_adapter(model, d, name='tickets')
    assert list(model.peft_config) == ['summary']


def test_nan_and_rank_mismatch(adapters, tmp_path):
    d = copy(adapters['tickets'], tmp_path, 'nan')
    w = load_file(d/ADAPTER_WEIGHTS)
    k = next(iter(w)); w[k][0, 0] = float('nan')
    save_file(w, d/ADAPTER_WEIGHTS)
    with pytest.raises(AdapterError, match='hold NaN or inf'):
        load_adapter(tiny(), d)
    d = copy(adapters['tickets'], tmp_path, 'rank')
    cfg = json.loads((d/ADAPTER_CONFIG).read_text()); cfg['r'] = 8
    (d/ADAPTER_CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match=r'has rank 16, but adapter_config.json says r=8'):
        load_adapter(tiny(), d)


def test_duplicate_name(adapters):
    model = load_adapter(tiny(), adapters['tickets'], name='tickets')
    with pytest.raises(AdapterError, match="an adapter named 'tickets' is already loaded"):
        load_adapter(model, adapters['summary'], name='tickets')


# --- several adapters ---------------------------------------------------------------------------------------------

def test_switching_adapters_changes_answers(adapters):
    tok = load_base('tiny', training=False)[1]
    recs = check_records(2)
    model = load_adapter(tiny(), adapters['tickets'], name='tickets')
    model = load_adapter(model, adapters['summary'], name='summary')
    answers = {}
    for name in (None, 'tickets', 'summary'):
        with using_adapter(model, name):
            answers[name] = generate_responses(model, tok, recs, max_new_tokens=8)
    assert model.active_adapter == 'tickets'
    assert answers['tickets'] != answers['summary'] != answers[None] != answers['tickets']
    # switching to an adapter answers exactly as that adapter loaded alone
    for t in TASKS:
        alone = load_adapter(tiny(), adapters[t])
        assert generate_responses(alone, tok, recs, max_new_tokens=8) == answers[t]


def test_combine_cat_is_the_sum_and_deterministic(adapters, tmp_path):
    tok = load_base('tiny', training=False)[1]
    model = load_adapter(tiny(), adapters['tickets'], name='tickets')
    model = load_adapter(model, adapters['summary'], name='summary')
    combine_adapters(model, ['tickets', 'summary'], [1.0, 0.5], 'mix')
    assert not any(m.training for m in model.modules())
    for mod in (model.base_model.model.model.layers[1].mlp.down_proj, model.base_model.model.model.layers[0].self_attn.k_proj):
        want = mod.get_delta_weight('tickets') + 0.5 * mod.get_delta_weight('summary')
        torch.testing.assert_close(mod.get_delta_weight('mix'), want, atol=1e-6, rtol=1e-5)
    # saved and loaded again, the combination computes the same logits
    saved = save_adapter(model, tmp_path/'mix', 'mix')
    again = load_adapter(tiny(), saved)
    with using_adapter(model, 'mix'):
        assert logit_gap(prompt_logits(model, tok, check_records(1)), prompt_logits(again, tok, check_records(1))) < 1e-6
    with pytest.raises(AdapterError, match='already exists'):
        save_adapter(model, saved, 'mix')


# --- merging ------------------------------------------------------------------------------------------------------

def test_merged_equals_unmerged(adapters, tmp_path):
    out, s = merge_adapter(adapters['summary'], tmp_path/'merged')
    assert out == tmp_path/'merged' and (out/'model.safetensors').exists() and (out/'tokenizer.json').exists()
    assert s['tolerance'] == MERGE_TOLERANCE  # the tiny model's logits are small: the absolute floor applies
    assert s['merge_max_abs_diff'] <= MERGE_TOLERANCE and s['saved_max_abs_diff'] <= MERGE_TOLERANCE
    assert s['greedy_same'] == s['check_prompts'] == 2 * len(SHIPPED_TASKS) and s['from_4bit'] is False  # check_records: two per shipped task
    assert json.loads((out/'merge.json').read_text())['merge_max_abs_diff'] == s['merge_max_abs_diff']
    # independently of merge_adapter's own checks: the saved model against base + adapter
    merged, tok = load_base(str(out), training=False)
    assert not has_lora(merged)
    unmerged = load_adapter(tiny(), adapters['summary'])
    recs = check_records(1)
    assert logit_gap(prompt_logits(merged, tok, recs), prompt_logits(unmerged, tok, recs)) <= MERGE_TOLERANCE
    assert generate_responses(merged, tok, recs, max_new_tokens=12) == generate_responses(unmerged, tok, recs, max_new_tokens=12)


def test_merge_bf16_and_refusals(adapters, tmp_path):
    out, s = merge_adapter(adapters['tickets'], tmp_path/'bf16', dtype='bfloat16', records=check_records(1), max_new_tokens=4)
    assert s['merge_max_abs_diff'] <= MERGE_TOLERANCE  # the merge itself is fp32; rounding comes after
    assert next(load_base(str(out), dtype='bfloat16', training=False)[0].parameters()).dtype == torch.bfloat16
    assert json.loads((out/'config.json').read_text())['dtype'] == 'bfloat16'
    with pytest.raises(AdapterError, match='already exists'):
        merge_adapter(adapters['tickets'], out)
    with pytest.raises(ValueError, match='float32 or bfloat16'):
        merge_adapter(adapters['tickets'], tmp_path/'x', dtype='float16')
    # a damaged adapter: an error, and neither the output nor a temporary folder left behind
    d = copy(adapters['tickets'], tmp_path, 'damaged')
    os.truncate(d/ADAPTER_WEIGHTS, 1000)
    with pytest.raises(AdapterError, match='truncated'):
        merge_adapter(d, tmp_path/'never')
    assert not any(p.name.startswith(('never', '.never')) for p in tmp_path.iterdir())


def test_merge_from_4bit(tmp_path):
    "A QLoRA run folder (config.ini says load_in_4bit): merged into the dequantized 4-bit weights by default"
    q, _ = load_base('tiny', load_in_4bit=True, training=False)
    peft = attach_lora(q, r=8, alpha=16)
    torch.manual_seed(1)
    for n, p in peft.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.05)
    run = tmp_path/'qlora-run'
    peft.save_pretrained(run/'adapter', save_embedding_layers=False)
    (run/'config.ini').write_text('[quant]\nload_in_4bit = true\nquant_type = nf4\ndouble_quant = true\n')
    recs = check_records(1)
    _, deq = merge_adapter(run/'adapter', tmp_path/'deq', records=recs, max_new_tokens=4)
    _, orig = merge_adapter(run/'adapter', tmp_path/'orig', from_4bit=False, records=recs, max_new_tokens=4)
    assert deq['from_4bit'] is True and orig['from_4bit'] is False and 'gap_to_4bit_adapter' not in orig
    assert deq['merge_max_abs_diff'] <= MERGE_TOLERANCE and orig['merge_max_abs_diff'] <= MERGE_TOLERANCE
    # merging into the dequantized weights reproduces the adapter on the 4-bit base up to its bf16 compute;
    # merging into the original weights differs by the quantization error of the base
    tok = load_base('tiny', training=False)[1]
    ref = prompt_logits(load_adapter(load_base('tiny', load_in_4bit=True, training=False)[0], run/'adapter'), tok, recs)
    gap_orig = logit_gap(prompt_logits(load_base(str(tmp_path/'orig'), training=False)[0], tok, recs), ref)
    assert deq['gap_to_4bit_adapter'] < gap_orig / 3, (deq['gap_to_4bit_adapter'], gap_orig)

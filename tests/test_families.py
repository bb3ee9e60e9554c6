"""Every model family end to end, on its tiny random model (lora_nb.models.tiny_family, no download).

Per family: load in fp32, bf16 and 4-bit; LoRA on all-linear and on named modules (a wrong name lists the family's
own names); packed (padding-free) attention equal to padded attention within 1e-5 in fp32, or the fallback said;
two training steps through `lora_nb.train.train`; eval; merge equal to unmerged; save/load with the wrong-base
refusal; the doctor; the memory estimate's counts against PEFT's.
"""
import gc, warnings

import pytest
import torch

from lora_nb.adapters import AdapterError, check_records, load_adapter, load_for_inference, logit_gap, merge_adapter, prompt_logits
from lora_nb.config import data_path, load_config
from lora_nb.data import read_records
from lora_nb.doctor import diagnose, format_findings
from lora_nb.infer import evaluate
from lora_nb.lora import meta_param_counts
from lora_nb.memory import estimate_memory, model_shape
from lora_nb.models import (FAMILY_CONFIGS, PackedAttentionWarning, TargetError, attach_lora, linear_layer_names,
                            load_base, packed_attention_problem, packing_gap, padded_attention, tiny_family_config)
from lora_nb.monitors import has_errors

FAMILIES = list(FAMILY_CONFIGS)
FALLBACK = {'gemma2'}  # packed attention cannot be exact (soft-capped logits): loaded with padded attention, and said
name_of = lambda family: 'tiny' if family == 'llama' else f'tiny-{family}'
other_family = lambda family: FAMILIES[(FAMILIES.index(family) + 1) % len(FAMILIES)]


@pytest.fixture(scope='module', autouse=True)
def frozen_heap():
    "Exempt the objects that exist now (the libraries) from garbage collection while this module runs"
    # every load_base on CPU runs gc.collect (lora_nb.core.release_free_memory), about 0.3 s over the libraries'
    # objects; the module loads about a hundred tiny models
    gc.freeze()
    yield
    gc.unfreeze()


def load(family, **kw):
    "load_base of a family's tiny model, with any PackedAttentionWarning caught and returned: (model, tok, warnings)"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', PackedAttentionWarning)
        model, tok = load_base(name_of(family), **kw)
    return model, tok, [str(w.message) for w in caught if w.category is PackedAttentionWarning]


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    "`trained(family)`: (config, run folder) of two training steps on the family's tiny model, trained once per module"
    from lora_nb.train import train  # the Trainer stack: only once a test trains
    out, runs = tmp_path_factory.mktemp('runs'), {}
    def get(family):
        if family not in runs:
            cfg = load_config(profile='fast', overrides=[f'model.name={name_of(family)}', f'train.output_dir={out}',
                  'data.train_file=data/tickets_val.jsonl',  # 200 records: tokenized in a fraction of the time
                  'train.max_steps=2', 'train.eval_steps=0', 'train.save_steps=0', 'train.lr=1e-2', 'train.warmup=0',
                  'eval.limit=2', 'eval.max_new_tokens=4'])
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', PackedAttentionWarning)
                runs[family] = cfg, train(cfg, name=family, plot=False)
        return runs[family]
    return get


@pytest.mark.parametrize('family', FAMILIES)
def test_loads_in_every_precision(family):
    for dtype, want in (('float32', torch.float32), ('bfloat16', torch.bfloat16)):
        model = load(family, dtype=dtype)[0]
        assert model.get_input_embeddings().weight.dtype == want
        assert torch.isfinite(model(torch.arange(3, 12)[None]).logits.float()).all()
    q = load(family, dtype='bfloat16', load_in_4bit=True)[0]
    head = q.get_output_embeddings()
    n4 = sum(type(m).__name__ == 'Linear4bit' for m in q.modules())
    assert n4 == 2 * len(linear_layer_names(q)) and not any(type(m) is torch.nn.Linear and m is not head for m in q.modules())
    assert torch.isfinite(q(torch.arange(3, 12)[None]).logits.float()).all()


@pytest.mark.parametrize('family', FAMILIES)
def test_lora_targets(family):
    model = load(family)[0]
    names = linear_layer_names(model)
    config = tiny_family_config(family)
    named = f"{'qkv_proj' if 'qkv_proj' in names else 'q_proj'},down_proj"  # the attention's input and the MLP's output
    for targets in ('all-linear', named):
        peft_model = attach_lora(load(family)[0], r=8, alpha=16, target_modules=targets)
        assert peft_model.get_nb_trainable_parameters()[0] == meta_param_counts(config, targets, 8)['lora'], targets
    with pytest.raises(TargetError, match=f"its linear layers are: {', '.join(names)}"):
        attach_lora(model, target_modules='q_proj,query_key_value')
    if family == 'phi3': assert names == ['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']


@pytest.mark.parametrize('family', FAMILIES)
def test_packed_equals_padded(family):
    packed, _, said = load(family, training=False)
    config = packed.config
    padded = load(family, training=False, attn_implementation=padded_attention(config))[0]
    assert packing_gap(packed.eval(), padded.eval()) < 1e-5  # sequences of 7, 40 and 5 tokens: longer than Gemma's window
    if family in FALLBACK:
        assert packed_attention_problem(config) and config._attn_implementation == padded_attention(config) == 'eager'
        assert len(said) == 1 and said[0].startswith(f'{config.model_type}:') and 'soft-capped' in said[0]
    else:
        assert packed_attention_problem(config) is None and config._attn_implementation == 'packed_sdpa' and not said


@pytest.mark.parametrize('family', FAMILIES)
def test_trains_evaluates_and_merges(family, trained, tmp_path):
    cfg, run = trained(family)
    assert (run/'adapter'/'adapter_model.safetensors').exists()
    model, tok = load_for_inference(adapter=run/'adapter', cfg=cfg)
    m = evaluate(model, tok, read_records(data_path(cfg.data.test_file)), cfg)
    assert m['n'] == cfg.eval.limit
    records = check_records(1)
    out, summary = merge_adapter(run/'adapter', tmp_path/'merged', records=records, max_new_tokens=4)
    assert summary['merge_max_abs_diff'] <= summary['tolerance'] and summary['saved_max_abs_diff'] <= summary['tolerance']
    # the trained adapter moved the logits far beyond that tolerance, so the merge had something to get right
    base = load(family, training=False)[0]
    before = prompt_logits(base, tok, records)
    assert logit_gap(before, prompt_logits(load_adapter(base, run/'adapter'), tok, records)) > 10 * summary['tolerance']
    assert type(load(family, training=False)[0]).__name__ == type(load_base(str(out), training=False)[0]).__name__


@pytest.mark.parametrize('family', FAMILIES)
def test_adapter_refuses_another_family(family, trained):
    _, run = trained(family)
    load_adapter(load(family, training=False)[0], run/'adapter')  # its own base: loads, checked
    with pytest.raises(AdapterError):
        load_adapter(load(other_family(family), training=False)[0], run/'adapter')


@pytest.mark.parametrize('family', FAMILIES)
def test_doctor_finds_no_errors(family, trained):
    cfg, _ = trained(family)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', PackedAttentionWarning)
        findings = diagnose(cfg, n_batches=1)
    assert not has_errors(findings), format_findings(findings)


@pytest.mark.parametrize('family', FAMILIES)
def test_estimate_counts_are_pefts(family):
    model = load(family)[0]
    base = model.num_parameters()
    trainable = attach_lora(model, r=16, alpha=32).get_nb_trainable_parameters()[0]
    est = estimate_memory(name_of(family), rank=16, seq=128)
    assert (est.params, est.trainable) == (base, trainable)
    assert model_shape(name_of(family)).params == meta_param_counts(tiny_family_config(family))['base'] == base
    if family == 'phi3': assert trainable == 26_624  # the figure Llama formulas got wrong (32,768)

"Bench: `run_bench` end to end on the tiny model (a smoke test: no timing is asserted), and its arithmetic."
import json, math
from types import SimpleNamespace
import pytest

from lora_nb.core import cpu_flags, cpu_name
from lora_nb.memory import model_shape
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from lora_nb.models import attach_lora, load_base, packed_sdpa_attention
from lora_nb.bench import (run_bench, summarize_bench, format_bench, lora_roofline, measure_recipe, PROFILE_GROUPS, op_group,
                           profile_groups, profile_step, step_gemms, bench_config, lever_model, run_lever_ratios, RATIO_LEVERS,
                           _attention_outside_compile)


@pytest.fixture(scope='module')
def tiny_bench(tmp_path_factory):
    "One bench of all six recipes on the tiny model: 2 steps of 2 examples each, eval on 8 validation examples; profiled"
    lines, path = [], tmp_path_factory.mktemp('bench')/'bench.json'
    summary = run_bench(model='tiny', steps=2, examples=8, batch_size=2, save=str(path), out=lines.append, profile=True)
    return summary, lines, path


def test_last_line_is_the_json_summary(tiny_bench):
    summary, lines, path = tiny_bench
    assert json.loads(lines[-1]) == summary
    assert json.loads(path.read_text()) == summary
    for key in ('speedup_vs_seed_recipe', 'speedup_vs_trl_default', 'roofline_fraction', 'qlora_to_lora_memory',
                'roofline_fraction_answer_head', 'matmul_gflops', 'recipes'):
        assert summary[key] is not None, key
    # when and where: a saved bench says what it was measured on, with the CPU's bf16 flags
    assert summary['machine']['cpus'] >= 1 and summary['machine']['cpu'] and summary['date']
    assert (summary['cpu'], summary['cpu_flags']) == (cpu_name(), cpu_flags())
    assert f"CPU: {cpu_name()}; bf16 flags: {', '.join(cpu_flags()) or 'none'}" in lines[-2]  # the table
    assert summary['load_average_before'] >= 0 and summary['wall_seconds'] > 0


def test_every_recipe_trained_the_same_examples(tiny_bench):
    summary, _, _ = tiny_bench
    recipes = summary['recipes']
    assert sorted(recipes) == ['lora_fp32', 'lora_nb', 'lora_nb_chat', 'qlora', 'qlora_no_gc', 'seed', 'trl']
    for r in recipes.values():
        assert (r['steps'], r['timed_steps'], r['train_examples'], r['val_examples']) == (2, 1, 4, 8)
        assert len(r['train_loss']) == 2 and all(math.isfinite(l) for l in r['train_loss'])
        assert math.isfinite(r['eval_loss']) and r['tokens_per_sec'] > 0 and r['memory_bytes'] > 0
    # the older recipe pads every example to 512 tokens and learns all of them; the others compute (almost) no padding
    assert recipes['seed']['computed_per_step'] == 2 * 512
    assert recipes['seed']['supervised_per_step'] > 0.9 * recipes['seed']['tokens_per_step']
    assert recipes['lora_nb']['computed_per_step'] == recipes['lora_nb']['tokens_per_step']
    # TRL and lora_nb see the same tokens (prompt, answer, EOS) and learn the same answer tokens
    assert recipes['trl']['tokens_per_step'] == recipes['lora_nb']['tokens_per_step']
    assert recipes['trl']['supervised_per_step'] == recipes['lora_nb']['supervised_per_step']
    # TRL's defaults as run: bf16 autocast and gradient checkpointing on; lora_nb: bf16 without checkpointing
    assert recipes['trl']['settings']['bf16'] and recipes['trl']['settings']['gradient_checkpointing']
    assert not recipes['seed']['settings']['bf16'] and not recipes['lora_nb']['settings']['gradient_checkpointing']
    # the base each recipe trained on: fp32 for the guides' recipes and lora_fp32, bf16 for lora_nb (dtype auto, bf16
    # autocast on this CPU) and for QLoRA's non-quantized weights; lora_nb splits packed rows in attention
    bf16 = recipes['lora_nb']['settings']['bf16']
    assert [recipes[r]['base_dtype'] for r in ('seed', 'trl', 'lora_fp32')] == ['float32'] * 3
    assert recipes['lora_nb']['base_dtype'] == recipes['qlora']['base_dtype'] == ('bfloat16' if bf16 else 'float32')
    assert recipes['lora_nb']['attn_implementation'] == 'packed_sdpa'
    # conversations through the same padding-free path: no padding computed, two answers per support chat learned
    chat = recipes['lora_nb_chat']
    assert chat['computed_per_step'] == chat['tokens_per_step'] and chat['supervised_per_step'] > recipes['lora_nb']['supervised_per_step']
    assert summary['chat_to_instruction_tokens_per_sec'] == chat['tokens_per_sec'] / recipes['lora_nb']['tokens_per_sec']
    assert recipes['qlora']['weight_bytes'] < recipes['lora_nb']['weight_bytes'] <= recipes['lora_fp32']['weight_bytes']
    # QLoRA as its recipe runs it (4-bit + gradient checkpointing), and the 4-bit base alone
    assert recipes['qlora']['load_in_4bit'] and recipes['qlora_no_gc']['load_in_4bit'] and not recipes['lora_nb']['load_in_4bit']
    assert recipes['qlora']['model_gradient_checkpointing'] and not recipes['qlora_no_gc']['model_gradient_checkpointing']


def test_summary_arithmetic():
    rec = lambda tps, mem, sup=0.25: dict(tokens_per_sec=tps, supervised_tokens_per_sec=tps * sup, tokens_per_cpu_sec=tps / 2, eval_loss=1.0,
                                          memory_bytes=mem, weight_bytes=mem / 2, tokens_per_step=100, supervised_per_step=100 * sup,
                                          matmul_params=dict(body=750, head=250), settings=dict(bf16=True))
    s = summarize_bench(dict(seed=rec(10, 800), trl=rec(50, 600), lora_nb=rec(100, 400), qlora=rec(40, 160)),
                        dict(fp32=1e-6, bf16=4e-6, bf16_cpu=2e-6))
    assert s['speedup_vs_seed_recipe'] == pytest.approx(10) and s['speedup_vs_trl_default'] == pytest.approx(2)
    assert s['qlora_to_lora_memory'] == pytest.approx(0.4) and s['qlora_to_lora_weights'] == pytest.approx(0.4)
    # with an fp32 LoRA run, QLoRA is compared with it, and lora_nb's own bf16 base is reported against both
    both = summarize_bench(dict(lora_nb=rec(100, 400), lora_fp32=rec(90, 640), qlora=rec(40, 160)), dict(fp32=1e-6, bf16=4e-6))
    assert both['qlora_to_lora_memory'] == pytest.approx(0.25) and both['qlora_to_bf16_lora_memory'] == pytest.approx(0.4)
    assert both['bf16_to_fp32_lora_memory'] == pytest.approx(0.625)
    # 4 FLOPs per weight per token: 4e3 FLOP/s / (4 x 1000) = 1 tok/s; with the head at a quarter of the positions, N = 812.5
    assert s['roofline']['tokens_per_sec'] == pytest.approx(1.0)
    assert s['roofline']['tokens_per_sec_answer_head'] == pytest.approx(1000 / 812.5)
    assert s['roofline_fraction'] == pytest.approx(100)
    # per CPU-second: 50 tok/CPU-s against a roofline of 2e3 / 4e3 = 0.5 tok/CPU-s
    assert s['roofline_fraction_cpu'] == pytest.approx(100) and s['speedup_vs_seed_recipe_cpu'] == pytest.approx(10)
    assert lora_roofline(4e-6, dict(body=750, head=250), 0.25) == pytest.approx(1000 / 812.5)
    missing = summarize_bench(dict(lora_nb=rec(100, 400)), dict(fp32=1e-6, bf16=4e-6))
    assert missing['speedup_vs_seed_recipe'] is None and missing['qlora_to_lora_memory'] is None
    assert missing['roofline_fraction_cpu'] is None  # no per-CPU-second peak measured
    assert missing['own_shape_fraction'] is None and missing['profile'] is None  # no profile taken
    # against the roofline at the step's own shapes: with LoRA's matmuls and without
    own = summarize_bench(dict(lora_nb=rec(100, 400)), dict(fp32=1e-6, bf16=4e-6), dict(tokens_per_sec=400, tokens_per_sec_base=500))
    assert own['own_shape_fraction'] == pytest.approx(0.25) and own['own_shape_fraction_base'] == pytest.approx(0.2)


def test_bad_arguments():
    with pytest.raises(ValueError, match='use one of seed, trl, lora_nb, lora_nb_chat, lora_fp32, qlora, qlora_no_gc'): measure_recipe('unsloth')
    with pytest.raises(ValueError, match='steps must be >= 2'): measure_recipe('lora_nb', steps=1)


def test_profile_of_lora_nb_step(tiny_bench):
    "run_bench(profile=True): every group has a row, the rows add up to the step, the matmuls are told apart"
    summary, lines, _ = tiny_bench
    p = summary['profile']
    rows = {g['group']: g for g in p['groups']}
    assert list(rows) == list(PROFILE_GROUPS)
    assert sum(g['share'] for g in rows.values()) == pytest.approx(1.0)
    assert sum(g['ms'] for g in rows.values()) == pytest.approx(p['ms_per_step'])
    assert (p['steps'], p['warmup_steps'], p['batch_size'], p['r']) == (1, 1, 2, 16)
    shape = model_shape('tiny')
    L, n = shape.layers, len(shape.linear_shapes())
    # base: forward + input gradient; LoRA's A and B: forward, input and weight gradient; the first layer's q, k, v
    # pass no gradient down to the frozen embeddings; the head: forward + input gradient
    assert (rows['base_matmul']['calls'], rows['lora_matmul']['calls'], rows['lm_head']['calls']) == (2 * L * n - 3, 6 * L * n - 3, 2)
    for g in ('attention', 'cross_entropy', 'optimizer', 'casts', 'elementwise'): assert rows[g]['ms'] > 0, g
    assert p['tokens_per_step'] > p['supervised_per_step'] > 0
    assert "where a lora_nb step goes" in '\n'.join(lines) and "LoRA's small matmuls" in lines[-2]


def test_own_shape_roofline(tiny_bench):
    "The second roofline: lora_nb's step's own matmuls timed, and lora_nb's tokens/s against it"
    summary, lines, _ = tiny_bench
    o, ours = summary['own_shape_roofline'], summary['recipes']['lora_nb']
    assert (o['tokens'], o['answer_tokens'], o['r']) == (round(ours['tokens_per_step']), round(ours['supervised_per_step']), 16)
    assert o['dtype'] == ('bfloat16' if ours['settings']['bf16'] else 'float32')
    assert all(v > 0 for v in o['gflops'].values()) and all(g['seconds'] > 0 for g in o['gemms'])
    assert 0 < o['tokens_per_sec'] < o['tokens_per_sec_base']
    assert summary['own_shape_fraction'] == pytest.approx(ours['tokens_per_sec'] / o['tokens_per_sec'])
    assert summary['own_shape_fraction_base'] == pytest.approx(ours['tokens_per_sec'] / o['tokens_per_sec_base'])
    assert any(l.startswith('own-shape roofline') for l in format_bench(summary).splitlines())


def test_step_gemms_are_the_roofline_work():
    "Base + head matmuls of a step are the 4N roofline's FLOPs; LoRA's add 6 FLOPs per LoRA weight per token"
    shape = model_shape('tiny')
    flops = lambda gemms, part: sum(2 * g['m'] * g['k'] * g['n'] * g['count'] for g in gemms if g['part'] == part)
    body = shape.layers * sum(i * o for i, o in shape.linear_shapes().values())
    gemms = step_gemms(shape, tokens=300, answer_tokens=70, r=8)
    assert flops(gemms, 'base') + flops(gemms, 'head') == 4 * (body * 300 + shape.vocab * shape.hidden * 70)
    assert flops(gemms, 'lora') == 6 * 300 * 8 * shape.layers * sum(i + o for i, o in shape.linear_shapes().values())
    qv = step_gemms(shape, tokens=300, answer_tokens=70, r=8, targets=['q_proj', 'v_proj'])
    assert flops(qv, 'lora') == 6 * 300 * 8 * shape.layers * (64 + 64 + 64 + 32)
    assert flops(qv, 'base') == flops(gemms, 'base')


def _event(name, parent=None, us=0.0, shapes=()):
    e = SimpleNamespace(name=name, cpu_parent=parent, self_cpu_time_total=us, input_shapes=[list(s) for s in shapes],
                        device_type=SimpleNamespace(name='CPU'))
    return e


def test_profile_groups_sorts_and_adds_up():
    "Context first (what an op runs inside), then matmul shapes, then names; 'other' takes the rest of the step"
    sdpa = _event('aten::scaled_dot_product_attention', us=100)
    opt = _event('Optimizer.step#AdamW.step', us=50)
    bwd = _event('autograd::engine::evaluate_function: LogSoftmaxBackward0', us=30)
    events = [sdpa, _event('aten::bmm', sdpa, 400), _event('aten::copy_', sdpa, 100),  # attention, whatever runs in it
              opt, _event('aten::_fused_adamw_', opt, 200),
              bwd, _event('aten::_log_softmax_backward_data', bwd, 300),
              _event('aten::mm', us=1000, shapes=[(371, 64), (64, 16)]), _event('aten::mm', us=3000, shapes=[(371, 64), (64, 128)]),
              _event('aten::addmm', us=500, shapes=[(49152,), (90, 64), (64, 49152)]),
              _event('aten::copy_', us=700), _event('aten::mul', us=900), _event('aten::view', us=10), _event('aten::brand_new', us=90)]
    rows = {g['group']: g for g in profile_groups(events, seconds_per_step=0.005, steps=2, r=16, vocab=49152)}
    ms = {g: round(v['ms'], 6) for g, v in rows.items()}
    assert ms == dict(elementwise=0.45, base_matmul=1.5, casts=0.35, lora_matmul=0.5, autograd=0.005, attention=0.3,
                      cross_entropy=0.165, lm_head=0.25, optimizer=0.125, other=5 - 3.645)
    assert rows['attention']['calls'] == 1.5 and sum(r['share'] for r in rows.values()) == pytest.approx(1.0)
    assert op_group('aten::_foreach_norm', [], 16, 49152) == 'optimizer'


def test_profile_step_needs_a_warmup_step():
    with pytest.raises(ValueError, match='warmup must be >= 1'): profile_step('tiny', steps=1, warmup=0)


class _Conversions(TorchDispatchMode):
    "Counts dtype conversions (aten::_to_copy) to fp32 run inside it"
    def __init__(self): super().__init__(); self.fp32 = 0
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.__name__.startswith('_to_copy') and kwargs.get('dtype') == torch.float32: self.fp32 += 1
        return func(*args, **kwargs)


def _lora_forward(input_casts, autocast=True):
    "Loss, LoRA gradients and fp32 conversions in the forward pass of the tiny bf16 model with an adapter (B non-zero)"
    m = attach_lora(load_base('tiny', dtype='bfloat16')[0], r=8, alpha=16, dropout=0.0, input_casts=input_casts)
    torch.manual_seed(0)
    for n, p in m.named_parameters():
        if 'lora_B' in n: torch.nn.init.normal_(p, std=0.02)
    ids = torch.arange(1, 33)[None]
    with torch.autocast('cpu', torch.bfloat16, enabled=autocast):
        with _Conversions() as conv: loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
    n_lora = sum(1 for mod in m.modules() if hasattr(mod, 'cast_input_dtype_enabled'))
    return float(loss.detach()), [p.grad.clone() for p in m.parameters() if p.requires_grad], conv.fp32, n_lora


def test_lora_input_casts_skipped_under_autocast():
    "The default adapter converts no LoRA input to fp32 under autocast (one conversion fewer per LoRA layer) and trains bit for bit the same"
    kept, skipped = _lora_forward(input_casts=True), _lora_forward(input_casts=False)
    assert kept[3] == skipped[3] == 14  # tiny: 2 layers x 7 projections
    assert kept[2] - skipped[2] == kept[3]
    assert kept[0] == skipped[0] and all(torch.equal(a, b) for a, b in zip(kept[1], skipped[1]))
    # without autocast the bf16 base still needs PEFT's cast (fp32 LoRA weights): it is back on, and the numbers agree
    plain_kept, plain_skipped = _lora_forward(True, autocast=False), _lora_forward(False, autocast=False)
    assert plain_skipped[2] == plain_kept[2] and plain_skipped[0] == pytest.approx(plain_kept[0], rel=1e-6)


def test_lever_models_change_what_they_claim():
    cfg = bench_config('tiny', 1, 2)
    default, _ = lever_model('tiny', {}, cfg)
    bf16, _ = lever_model('tiny', dict(lora_dtype='bfloat16'), cfg)
    assert {p.dtype for p in default.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in bf16.parameters() if p.requires_grad} == {torch.bfloat16}
    assert {p.dtype for p in default.parameters() if not p.requires_grad} == {torch.bfloat16}  # the base, as lora_nb trains it
    casts = lever_model('tiny', dict(input_casts=True), cfg)[0]
    flags = lambda m: {mod.cast_input_dtype_enabled for mod in m.modules() if hasattr(mod, 'cast_input_dtype_enabled')}
    assert flags(casts) == flags(default) == {True}  # outside autocast both cast; the default turns them off per forward under autocast
    assert len(default.get_base_model()._forward_pre_hooks) == 1 and not casts.get_base_model()._forward_pre_hooks


def test_attention_outside_compile_is_undone():
    with _attention_outside_compile(True): assert ALL_ATTENTION_FUNCTIONS['packed_sdpa'] is not packed_sdpa_attention
    assert ALL_ATTENTION_FUNCTIONS['packed_sdpa'] is packed_sdpa_attention
    with pytest.raises(RuntimeError), _attention_outside_compile(True): raise RuntimeError
    assert ALL_ATTENTION_FUNCTIONS['packed_sdpa'] is packed_sdpa_attention


def test_lever_ratios_record(tmp_path):
    "Interleaved levers on the tiny model: ratios against the first row, losses that show which levers change the arithmetic"
    path, threads = tmp_path/'levers.json', torch.get_num_threads()
    d = run_lever_ratios('tiny', save=str(path), threads=1, levers=RATIO_LEVERS[:4], groups=2, unit=16, batch_size=8, out=lambda s: None)
    assert json.loads(path.read_text()) == json.loads(json.dumps(d)) and torch.get_num_threads() == threads
    assert d['threads'] == 1 and d['machine']['cpu'] == cpu_name() and len(d['load_average_before']) == 3
    rows = {r['lever']: r for r in d['rows']}
    assert list(rows) == [n for n, _ in RATIO_LEVERS[:4]]
    assert rows['lora_nb default']['ratio'] == rows['lora_nb default']['ratio_cpu'] == 1.0
    assert all(r['ratio'] > 0 and len(r['groups']) == 2 for r in rows.values())
    base = rows['lora_nb default']['losses']
    assert len(base) == 3 * 2 and rows["PEFT's input casts kept"]['losses'] == base  # exact: the same run
    assert rows['LoRA weights stored in bf16']['losses'][0] == base[0] and rows['LoRA weights stored in bf16']['losses'] != base
    assert len(rows['16 examples a step']['losses']) == 3  # one step per group of 16

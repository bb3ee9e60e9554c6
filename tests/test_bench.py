"Bench: `run_bench` end to end on the tiny model (a smoke test: no timing is asserted), and its arithmetic."
import json, math
import pytest

from lora_nb.bench import run_bench, summarize_bench, format_bench, lora_roofline, measure_recipe


@pytest.fixture(scope='module')
def tiny_bench(tmp_path_factory):
    "One bench of all six recipes on the tiny model: 2 steps of 2 examples each, eval on 8 validation examples"
    lines, path = [], tmp_path_factory.mktemp('bench')/'bench.json'
    summary = run_bench(model='tiny', steps=2, examples=8, batch_size=2, save=str(path), out=lines.append)
    return summary, lines, path


def test_last_line_is_the_json_summary(tiny_bench):
    summary, lines, path = tiny_bench
    assert json.loads(lines[-1]) == summary
    assert json.loads(path.read_text()) == summary
    for key in ('speedup_vs_seed_recipe', 'speedup_vs_trl_default', 'roofline_fraction', 'qlora_to_lora_memory',
                'roofline_fraction_answer_head', 'matmul_gflops', 'recipes'):
        assert summary[key] is not None, key
    # when and where: a saved bench says what it was measured on
    assert summary['machine']['cpus'] >= 1 and summary['machine']['cpu'] and summary['date']
    assert summary['load_average_before'] >= 0 and summary['wall_seconds'] > 0


def test_every_recipe_trained_the_same_examples(tiny_bench):
    summary, _, _ = tiny_bench
    recipes = summary['recipes']
    assert sorted(recipes) == ['lora_fp32', 'lora_nb', 'qlora', 'qlora_no_gc', 'seed', 'trl']
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


def test_bad_arguments():
    with pytest.raises(ValueError, match='use one of seed, trl, lora_nb, lora_fp32, qlora, qlora_no_gc'): measure_recipe('unsloth')
    with pytest.raises(ValueError, match='steps must be >= 2'): measure_recipe('lora_nb', steps=1)

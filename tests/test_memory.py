"Memory estimates (lora_nb.memory): config sources, parts, processes, DDP traffic, formatting, and real measurements."
import json, math

import pytest
from transformers import LlamaConfig

from lora_nb.memory import (ModelShape, estimate_memory, format_estimate, gradient_bytes, lora_tensor_sizes, max_batch,
                            measure_ddp_bytes, measure_peak_memory, model_shape, nf4_bytes, optimizer_bytes,
                            ring_allreduce_bytes, zero_memory_rows, _readable)

LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "vocab_size": 32000, "tie_word_embeddings": False}


def test_config_sources_agree(tmp_path):
    (tmp_path/'config.json').write_text(json.dumps(LLAMA2_7B))
    shapes = [model_shape(tmp_path), model_shape(tmp_path/'config.json'), model_shape(str(tmp_path)),
              model_shape(LLAMA2_7B), model_shape(LlamaConfig(**LLAMA2_7B))]
    assert {s.params for s in shapes} == {6_738_415_616}
    assert len({(s.vocab, s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.head_dim, s.tied) for s in shapes}) == 1


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match='lacks hidden_size'): model_shape({k: v for k, v in LLAMA2_7B.items() if k != 'hidden_size'})
    with pytest.raises(OSError, match='no such config'): model_shape(str(tmp_path/'missing'/'config.json'))


def test_builtin_names():
    assert model_shape('smollm2-135m').params == 134_515_008
    tiny = model_shape('tiny')
    assert (tiny.layers, tiny.hidden, tiny.vocab, tiny.tied) == (2, 64, 49152, True)


def test_gqa_and_lora_counts():
    smol = model_shape('smollm2-135m')
    assert (smol.heads, smol.kv_heads, smol.head_dim) == (9, 3, 64)
    assert sum(lora_tensor_sizes(smol, 16)) == 30 * 16 * (1152 + 768 + 768 + 1152 + 2112 + 2112 + 2112)
    assert sum(lora_tensor_sizes(smol, 8, ['q_proj', 'v_proj'])) == 30 * 8 * (1152 + 768)


def test_nf4_double_quant_overhead():
    n = 4096 * 4096
    overhead_bits = lambda dq: (nf4_bytes(n, dq) - n / 2) * 8 / n
    assert math.isclose(overhead_bits(True), 8 / 64 + 32 / (64 * 256), rel_tol=0.01)  # ~0.127 bit/param
    assert math.isclose(overhead_bits(False), 0.5, rel_tol=0.01)


def test_optimizers():
    assert optimizer_bytes([1000], 'adamw') == 8000
    assert optimizer_bytes([1000], 'adamw_8bit') == 8000  # under 4,096 elements: 32-bit states
    assert optimizer_bytes([8192], 'adamw_8bit') == 2 * 8192 + 8 * 32
    assert optimizer_bytes([1000], 'sgd') == 0 and optimizer_bytes([1000], 'sgd', master_weights=True) == 4000
    with pytest.raises(ValueError, match='use one of'): optimizer_bytes([1], 'lion')


def test_parts_move_the_right_way():
    lora, qlora, full = (estimate_memory(LLAMA2_7B, method=m) for m in ('lora', 'qlora', 'full'))
    assert qlora.weights < full.weights < lora.weights  # LoRA: the frozen base plus fp32 adapters
    assert lora.trainable == qlora.trainable < full.trainable == full.params
    assert full.weights + full.gradients + full.optimizer == 16 * full.params  # mixed-precision AdamW
    assert lora.activations_checkpointed < lora.activations
    longer = estimate_memory(LLAMA2_7B, seq=1024)
    assert longer.activations > 1.9 * lora.activations and longer.weights == lora.weights
    gc = estimate_memory(LLAMA2_7B, gradient_checkpointing=True)
    assert gc.total == lora.total - lora.activations + lora.activations_checkpointed


def test_zero_stages_shard_in_order():
    per = {z: estimate_memory(LLAMA2_7B, method='full', n_processes=4, zero_stage=z) for z in range(4)}
    one = estimate_memory(LLAMA2_7B, method='full')
    assert per[0].gradients == 2 * one.gradients  # DDP buckets
    assert per[1].optimizer == math.ceil(one.optimizer / 4) and per[1].gradients == one.gradients
    assert per[2].gradients == math.ceil(one.gradients / 4)
    assert one.weights / 4 < per[3].weights < one.weights / 2
    assert per[3].total < per[2].total < per[1].total < per[0].total
    assert {e.activations for e in per.values()} == {one.activations}  # batch is per process
    with pytest.raises(ValueError, match='zero_stage 5'): estimate_memory(LLAMA2_7B, zero_stage=5)


def test_format_estimate():
    e = estimate_memory('tiny', dtype='fp32', seq=512, batch=4)
    text = format_estimate(e)
    for part in ('weights', 'gradients', 'optimizer states', 'activations', 'total', 'tiny', 'batch 4 x seq 512'):
        assert part in text
    assert 'with gradient checkpointing' in text
    assert 'without gradient checkpointing' in format_estimate(estimate_memory('tiny', gradient_checkpointing=True))


def test_max_batch():
    kw = dict(rank=16, seq=1024, gradient_checkpointing=True)
    b = max_batch(LLAMA2_7B, 24e9, **kw)
    assert b >= 1
    assert estimate_memory(LLAMA2_7B, batch=b, **kw).total <= 24e9 < estimate_memory(LLAMA2_7B, batch=b + 1, **kw).total
    assert max_batch(LLAMA2_7B, 24e9, rank=16, seq=1024) == 0  # without checkpointing not even one sequence fits
    assert max_batch(LLAMA2_7B, 1e9) == 0


def test_measured_peak_within_25_percent():
    "A real LoRA run of the tiny model, in a fresh process, against its estimate"
    m = measure_peak_memory('tiny', 'lora', 'fp32', rank=8, seq=256, batch=2)
    e = estimate_memory('tiny', 'lora', rank=8, seq=256, batch=2, dtype='fp32', device='cpu')
    assert m['peak_reset_after_load'] and len(m['losses']) == 2
    assert 0.75 <= m['peak_bytes'] / e.total <= 1.25, (m, e.total)


def test_mixed_precision_and_logit_tokens():
    mixed = estimate_memory(LLAMA2_7B, method='full', dtype='bf16-mixed')
    assert mixed.weights + mixed.gradients + mixed.optimizer == 16 * mixed.params  # fp32 weights: no separate master copy
    lora = estimate_memory('smollm2-135m', dtype='bf16-mixed', seq=1024)
    answers = estimate_memory('smollm2-135m', dtype='bf16-mixed', seq=1024, logit_tokens=100)
    V = model_shape('smollm2-135m').vocab
    assert lora.activations - answers.activations == (1024 - 100) * (12 * V + 8)
    assert 'bf16 weight copies (autocast)' in lora.activation_parts
    with pytest.raises(ValueError, match='bf16-mixed'): estimate_memory('tiny', dtype='int4')


def test_ddp_traffic_arithmetic():
    assert gradient_bytes('tiny', 'lora', 16) == 4 * sum(lora_tensor_sizes(model_shape('tiny'), 16))
    assert gradient_bytes(LLAMA2_7B, 'full', grad_bytes=2) == 2 * 6_738_415_616
    assert [ring_allreduce_bytes(1000, n) for n in (1, 2, 4, 8)] == [0, 1000, 1500, 1750]


def test_ddp_hook_counts_only_the_adapter():
    "One DDP step of the tiny model in a fresh process: the all-reduced bytes are the trainable ones, as computed"
    steps = measure_ddp_bytes('tiny', 8)
    lora, full = steps['LoRA r=8'], steps['full fine-tuning']
    assert lora['allreduced_bytes'] == lora['trainable_bytes'] == gradient_bytes('tiny', 'lora', 8)
    assert full['allreduced_bytes'] == full['trainable_bytes'] and full['frozen_bytes'] == 0


def test_zero_rows_readable_from_the_package():
    "zero_memory_rows and _readable as the package exports them (_readable once called a name memory did not import)"
    rows = zero_memory_rows(LLAMA2_7B, 4, seq=64)
    assert [(r['mode'], r['processes']) for r in rows] == [('1 process', 1), ('DDP', 4), ('ZeRO-2', 4), ('ZeRO-3', 4)]
    assert rows[3]['weights'] < rows[2]['weights'] == rows[1]['weights']
    shown = _readable(rows)
    assert all(r['processes'] == o['processes'] for r, o in zip(shown, rows))
    assert all(isinstance(v, str) and v.endswith(('MB', 'GB')) for r in shown for k, v in r.items() if k not in ('mode', 'processes'))

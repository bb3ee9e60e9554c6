"""llama.cpp's own tools on every family and on SmolLM2 (`make test-llamacpp`; needs the [llamacpp] extra).

Per family, on its tiny random model (final norm scaled up so that greedy choices are not near-ties):
llama.cpp's `convert_hf_to_gguf.py` writes it; llama.cpp tokenizes as transformers does (where both read the same
tokenizer); on llama.cpp's token ids its f32 logits equal transformers' within 1e-3 of their largest magnitude and
its greedy tokens are the same; at Q8_0 the top-1 token agrees at >= 95% of positions; Q4_K_M from llama.cpp's
quantizer loads and runs. A converter's refusal carries its own reason; a Gemma 3 layer pattern llama.cpp would
run wrongly is refused by lora_nb. On SmolLM2: chapter 13's writer and the converter write the same tensors and
key metadata, and a ticket adapter applied as a GGUF LoRA to the base GGUF answers like the merged GGUF; the command
line exports Q4_K_M.
"""
import numpy as np
import pytest
import torch

from conftest import require
from lora_nb.adapters import merge_adapter
from lora_nb.config import data_path, load_config
from lora_nb.data import build_prompt, read_records
from lora_nb.deploy import (convert_hf, convert_lora, export_model, gguf_differences, llama_cpp_generate, llama_cpp_logits,
                            llama_cpp_status, llama_cpp_tokenize)
from lora_nb.export import ExportError, export_gguf, gguf_metadata
from lora_nb.tasks import first_json_object
from lora_nb.models import FAMILY_CONFIGS, load_base, resolve_model, tiny_family_config
from transformers import AutoModelForCausalLM, AutoTokenizer

FAMILIES = list(FAMILY_CONFIGS)
name_of = lambda family: 'tiny' if family == 'llama' else f'tiny-{family}'
# Tiny models borrow SmolLM2's byte-level BPE tokenizer. llama.cpp's converter reads Gemma 2's and Phi-3's
# SentencePiece tokenizer.model, which real checkpoints ship: their tiny models here get one, trained offline in a
# second on ticket texts (with Phi-3's chat tokens, which llama.cpp looks up by name). transformers reloads SmolLM2's
# vocabulary under a qwen2 model type with Qwen2's pre-tokenizer, a combination no real checkpoint has and the
# converter (which recognises tokenizers by a hash of their behaviour) refuses, with its reason.
SENTENCEPIECE = {'gemma2', 'phi3', 'qwen2'}
# Qwen2 too gets the SentencePiece model, which the converter then reads; transformers reads the same file under a
# qwen2 model type as Qwen2's byte-level BPE, so the two tokenize differently (a real Qwen2 checkpoint ships a BPE
# tokenizer the converter knows by its hash): the model is compared on llama.cpp's token ids, as for every family.
TOKENIZERS_DIFFER = {'qwen2'}
CFG = load_config(profile='fast')


@pytest.fixture(scope='module', autouse=True)
def llama_cpp():
    require(llama_cpp_status() is None, f"{llama_cpp_status()} (make install builds it)")


@pytest.fixture(scope='module')
def prompts():
    recs = read_records(data_path(CFG.data.test_file))[:4]
    return [build_prompt(r, CFG.data.template, None) for r in recs]


@pytest.fixture(scope='module')
def sentencepiece_model():
    "A 512-piece SentencePiece BPE model (byte fallback) trained on ticket texts, as bytes"
    import io
    import sentencepiece as spm
    texts = [f"{r['instruction']}\n{r['input']}\n{r['output']}" for r in read_records(data_path(CFG.data.train_file))[:400]]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=buf, vocab_size=512, model_type='bpe', byte_fallback=True,
                                   character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2,
                                   user_defined_symbols=['<|endoftext|>', '<|assistant|>', '<|system|>', '<|end|>', '<|user|>'],
                                   normalization_rule_name='identity', remove_extra_whitespaces=False)  # as Llama/Gemma/Phi-3 ship theirs
    return buf.getvalue()


def sentencepiece_family(family, folder, spm_bytes):
    "A seeded random two-layer model of `family` (512-token vocabulary) and a tokenizer from `spm_bytes`, saved in `folder`"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_family_config(family, vocab_size=512), dtype=torch.float32, attn_implementation='eager')
    model.save_pretrained(folder)
    (folder/'tokenizer.model').write_bytes(spm_bytes)
    return model, AutoTokenizer.from_pretrained(folder)


def peaked(family, folder, spm_bytes):
    "A copy of the family's tiny model whose final norm is scaled up 30x, so its next-token choices are clear"
    if family in SENTENCEPIECE: model, tok = sentencepiece_family(family, folder, spm_bytes)
    else: model, tok = load_base(name_of(family), training=False)
    if family == 'gemma3':  # the tiny model alternates sliding/full layers; llama.cpp runs Gemma 3's own 5:1 pattern
        with pytest.raises(ExportError, match=r"layer_types\[1\] is 'full_attention'"): convert_hf(resolve_model('tiny-gemma3'), folder/'x.gguf')
        real = AutoModelForCausalLM.from_config(tiny_family_config('gemma3', layer_types=['sliding_attention'] * 2), dtype=torch.float32)
        real.load_state_dict(model.state_dict()); model = real
    with torch.no_grad():
        w = model.model.norm.weight
        if family.startswith('gemma'): w.copy_((1 + w) * 30 - 1)  # Gemma's RMSNorm multiplies by (1 + weight)
        else: w.mul_(30)
    model.save_pretrained(folder); tok.save_pretrained(folder)
    return model.eval(), tok


def greedy_from_ids(model, ids:list, n:int) -> list:
    "transformers' greedy continuation of token ids, up to the config's EOS"
    eos = model.config.eos_token_id
    with torch.no_grad(): g = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
    return g[:g.index(eos)] if eos in g else g


@pytest.mark.parametrize('family', FAMILIES)
def test_family_through_llama_cpp(family, prompts, sentencepiece_model, tmp_path):
    model, tok = peaked(family, tmp_path/'model', sentencepiece_model)
    f32 = convert_hf(tmp_path/'model', tmp_path/'f32.gguf', 'f32')
    ids = llama_cpp_tokenize(f32, prompts)
    if family not in TOKENIZERS_DIFFER: assert ids == [tok(p, add_special_tokens=False)['input_ids'] for p in prompts]
    want = []  # the model, in transformers, on llama.cpp's token ids
    for i, lg in zip(ids, llama_cpp_logits(f32, prompts)):
        with torch.no_grad(): ref = model(input_ids=torch.tensor([i])).logits[0].numpy()
        np.testing.assert_allclose(lg, ref, atol=1e-3 * np.abs(ref).max(), rtol=0)  # f32 sums in another order
        want.append(ref.argmax(-1))
    assert llama_cpp_generate(f32, prompts, 16) == [greedy_from_ids(model, i, 16) for i in ids]
    q8 = convert_hf(tmp_path/'model', tmp_path/'q8_0.gguf', 'q8_0')
    agree = np.concatenate([lg.argmax(-1) == w for lg, w in zip(llama_cpp_logits(q8, prompts), want)])
    assert agree.mean() >= 0.95, (family, agree.mean())
    q4 = export_model(tmp_path/'model', tmp_path/'q4_k_m.gguf', 'q4_k_m')
    assert gguf_metadata(q4)['general.file_type'] == 15 and q4.stat().st_size < f32.stat().st_size
    assert len(llama_cpp_generate(q4, prompts[:1], 8)[0]) > 0


def test_converter_refusal_carries_its_reason(tmp_path):
    "The converter's own last words reach the user, and nothing is written"
    with pytest.raises(ExportError, match="tiny-qwen2.*convert_hf_to_gguf.py refused it: .*pre-tokenizer was not recognized"):
        convert_hf(resolve_model('tiny-qwen2'), tmp_path/'q.gguf')
    assert not list(tmp_path.iterdir())


# ---- SmolLM2 ----

@pytest.fixture(scope='module')
def smollm2():
    return resolve_model('smollm2-135m')


def test_teaching_writer_equals_the_converter_on_smollm2(smollm2, tmp_path):
    ours = export_gguf(smollm2, tmp_path/'ours.gguf', 'f32')
    theirs = convert_hf(smollm2, tmp_path/'theirs.gguf', 'f32')
    d = gguf_differences(ours, theirs)
    assert d['tensors'] == {} and d['max_abs_difference'] == 0.0, d['tensors']
    cosmetic = {k for k in d['metadata'] if k.startswith('general.') and k not in ('general.architecture', 'general.type', 'general.file_type')}
    explained = {'tokenizer.ggml.pre', 'tokenizer.ggml.eot_token_id', 'tokenizer.ggml.add_eos_token'}
    assert set(d['metadata']) <= cosmetic | explained, set(d['metadata']) - cosmetic - explained
    assert d['metadata']['tokenizer.ggml.pre'] == ('gpt-2', 'smollm')
    probe = ["Order #58392 cost 12,50 € 😀", "<|im_start|>user\nHi  there\t!<|im_end|>\n"]
    assert llama_cpp_tokenize(ours, probe) == llama_cpp_tokenize(theirs, probe)


@pytest.fixture(scope='module')
def ticket_adapter(tmp_path_factory):
    "A SmolLM2 ticket adapter: a short real run (the default settings, 30 steps), merged"
    from lora_nb.train import train
    out = tmp_path_factory.mktemp('smollm2-ticket')
    cfg = load_config(profile='', overrides=['train.max_steps=30', 'train.eval_steps=1000', 'train.save_steps=1000',
                                             f'train.output_dir={out}'])
    run = train(cfg, name='ticket')
    merge_adapter(run/'adapter', out/'merged')
    return cfg, run/'adapter', out/'merged'


def test_smollm2_adapter_as_gguf_lora_answers_like_the_merged_gguf(smollm2, ticket_adapter, tmp_path):
    cfg, adapter, merged = ticket_adapter
    _, tok = load_base(str(merged), training=False)
    recs = read_records(data_path(cfg.data.test_file))[:8]
    prompts = [build_prompt(r, cfg.data.template, tok) for r in recs]
    merged_f32 = export_model(merged, tmp_path/'merged-f32.gguf', 'f32')
    base_f32 = export_model(smollm2, tmp_path/'base-f32.gguf', 'f32')
    lora = convert_lora(adapter, tmp_path/'adapter.gguf')
    want = llama_cpp_generate(merged_f32, prompts, cfg.eval.max_new_tokens)
    assert llama_cpp_generate(base_f32, prompts, cfg.eval.max_new_tokens, lora=lora) == want
    assert sum(first_json_object(tok.decode(w)) is not None for w in want) >= 6  # it learned the task's shape (zero-shot: rarely JSON)


def test_export_q4_k_m_from_the_command_line(ticket_adapter, tmp_path):
    from test_cli import run
    _, _, merged = ticket_adapter
    code, out, err = run('export', '--model', merged, '--output', tmp_path/'ticket-q4_k_m.gguf', '--dtype', 'q4_k_m', '--ollama')
    assert code == 0 and err == '', err[-3000:]
    assert gguf_metadata(tmp_path/'ticket-q4_k_m.gguf')['general.file_type'] == 15
    assert 'FROM ./ticket-q4_k_m.gguf' in (tmp_path/'Modelfile').read_text()
    code, out, err = run('export', '--model', resolve_model('tiny-qwen3'), '--output', tmp_path/'qwen3.gguf', '--dtype', 'q4_k_m')
    assert code == 0 and err == '', err[-3000:]
    assert gguf_metadata(tmp_path/'qwen3.gguf')['general.architecture'] == 'qwen3'

"""GGUF export (lora_nb.export) and running the files (lora_nb.deploy): round trips through transformers (and llama.cpp
when installed), Q8_0 on the real model, LoRA files and their refusals, the chat template and end-of-turn id in the
GGUF, the Ollama Modelfile (Alpaca, and chat templates translated to Go and checked on multi-turn conversations)."""
import json, os
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from lora_nb.core import LoraNbError
from lora_nb.config import data_path, load_config
from lora_nb.tasks import TASKS
from lora_nb.data import build_prompt, end_of_turn, read_records
from lora_nb.models import attach_lora, embedded_checkpoint, load_base, load_tokenizer, resolve_model
from lora_nb.adapters import AdapterError
from lora_nb.export import (ExportError, check_gguf_lora, end_of_turn_id, export_gguf, export_lora_gguf, gguf_metadata, gguf_tensor_table,
                            llama_gguf_tensors, load_gguf, read_model_config, tokenizer_metadata)
from lora_nb.deploy import (OLLAMA_ALPACA, export_for_ollama, llama_cpp_generate, llama_cpp_status, llama_cpp_tokenize,
                            ollama_chat_template, ollama_values, render_go_template, transformers_greedy_ids, write_modelfile)

CFG = load_config(profile='fast')
RECORDS = read_records(data_path(CFG.data.test_file))[:8]


def _stand_in(tmp: Path, **lora_kw):
    "A tiny base + adapter whose B matrices are random (as if trained): (adapter dir, merged dir, merged model, tokenizer)"
    base, tok = load_base('tiny', training=False)
    pm = attach_lora(base, r=8, alpha=16, **lora_kw)
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if 'lora_B' in n: p.normal_(0, 0.05)
    pm.save_pretrained(tmp/'adapter', save_embedding_layers=False)
    merged = pm.merge_and_unload().eval()
    merged.save_pretrained(tmp/'merged'); tok.save_pretrained(tmp/'merged')
    return tmp/'adapter', tmp/'merged', merged, tok


@pytest.fixture(scope='module')
def stand_in(tmp_path_factory):
    return _stand_in(tmp_path_factory.mktemp('stand_in'))


@pytest.fixture(scope='module')
def f32_file(stand_in, tmp_path_factory):
    return export_gguf(stand_in[1], tmp_path_factory.mktemp('f32')/'model-f32.gguf', 'f32')


def _prompts(tok): return [build_prompt(r, 'alpaca', tok) for r in RECORDS]


def test_f32_round_trip_is_exact(stand_in, f32_file):
    from lora_nb.infer import generate_responses
    _, _, merged, tok = stand_in
    model, gtok = load_gguf(f32_file)
    texts = [p + r['output'] for p, r in zip(_prompts(tok), RECORDS)]
    batch = tok(texts, return_tensors='pt', padding=True)
    with torch.no_grad(): a, b = merged(**batch).logits, model(**batch).logits
    assert (a - b)[batch['attention_mask'].bool()].abs().max().item() <= 1e-4
    assert generate_responses(model, gtok, RECORDS, max_new_tokens=16) == generate_responses(merged, tok, RECORDS, max_new_tokens=16)
    # the tokenizer rebuilt from the file's metadata
    probe = texts + ["<|im_start|>user\nÇa coûte 12,50 € 😀<|im_end|>\n", "  two  spaces\tand\ttabs\n\n"]
    assert gtok.get_vocab() == tok.get_vocab()
    assert [gtok(s)['input_ids'] for s in probe] == [tok(s)['input_ids'] for s in probe]
    assert (gtok.eos_token, gtok.pad_token, gtok.bos_token, gtok.chat_template) == (tok.eos_token, tok.pad_token, tok.bos_token, tok.chat_template)


def test_file_metadata_and_tensors(stand_in, f32_file, tmp_path):
    md = gguf_metadata(f32_file)
    c = read_model_config(stand_in[1])
    assert (md['general.architecture'], md['general.type'], md['general.file_type']) == ('llama', 'model', 0)
    assert (md['llama.block_count'], md['llama.embedding_length'], md['llama.attention.head_count_kv']) == (2, 64, 2)
    assert md['llama.context_length'] == c['max_position_embeddings'] and md['tokenizer.ggml.eos_token_id'] == 2
    names = [t['name'] for t in gguf_tensor_table(f32_file)]
    assert 'output.weight' not in names and 'token_embd.weight' in names and len(names) == 2 + 9 * 2
    q8 = export_gguf(stand_in[1], tmp_path/'m.gguf', 'q8_0')
    types = {t['name']: t['type'] for t in gguf_tensor_table(q8)}
    assert types['blk.0.attn_q.weight'] == 'Q8_0' and types['blk.0.attn_norm.weight'] == 'F32' and types['token_embd.weight'] == 'Q8_0'
    assert q8.stat().st_size < 0.4 * f32_file.stat().st_size


@pytest.mark.slow
def test_q8_0_on_smollm2(tmp_path):
    """The real model: the Q8_0 file holds exactly gguf.quants' Q8_0 of every weight (bit for bit, after transformers
    undoes the q/k permutation), and the next-token choice mostly survives quantization"""
    import gguf
    f = export_gguf(embedded_checkpoint(), tmp_path/'smol-q8_0.gguf', 'q8_0')
    ref, tok = load_base('smollm2-135m', training=False)
    q8, _ = load_gguf(f, tokenizer=False)
    from_file, Q = q8.state_dict(), gguf.GGMLQuantizationType.Q8_0
    for name, p in ref.state_dict().items():
        w = p.numpy()
        want = gguf.quants.dequantize(gguf.quants.quantize(w, Q), Q).reshape(w.shape) if w.ndim == 2 else w
        assert np.array_equal(from_file[name].numpy(), want), name
    texts = [p + r['output'] for p, r in zip(_prompts(tok), RECORDS)]
    batch = tok(texts, return_tensors='pt', padding=True)
    mask = batch['attention_mask'].bool()
    with torch.no_grad(): a, b = ref(**batch).logits, q8(**batch).logits
    agree = (a.argmax(-1) == b.argmax(-1))[mask].float().mean().item()
    assert agree >= 0.95, agree  # measured 0.975 on these 752 positions: Q8_0's own cost on a 135M model


def test_failed_export_leaves_nothing(stand_in, tmp_path, monkeypatch):
    import lora_nb.export as ex
    real = ex.llama_gguf_tensors
    def broken(model_dir, c):
        out = real(model_dir, c)
        def boom(): raise RuntimeError('disk on fire')
        return out[:3] + [(out[3][0], out[3][1], boom)] + out[4:]
    monkeypatch.setattr(ex, 'llama_gguf_tensors', broken)
    with pytest.raises(RuntimeError, match='disk on fire'): export_gguf(stand_in[1], tmp_path/'x.gguf')
    assert list(tmp_path.iterdir()) == []


def test_refusals(stand_in, tmp_path):
    (tmp_path/'qwen').mkdir(); (tmp_path/'qwen'/'config.json').write_text('{"model_type": "qwen2"}')
    with pytest.raises(ExportError, match="model_type is 'qwen2'"): export_gguf(tmp_path/'qwen', tmp_path/'q.gguf')
    with pytest.raises(ExportError, match="dtype 'q4_0'"): export_gguf(stand_in[1], tmp_path/'q.gguf', 'q4_0')
    with pytest.raises(AdapterError, match='adapter_config.json: missing'): export_lora_gguf(stand_in[1], tmp_path/'a.gguf')
    rope = json.loads((stand_in[1]/'config.json').read_text())
    (tmp_path/'yarn').mkdir()
    (tmp_path/'yarn'/'config.json').write_text(json.dumps({**rope, 'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4, 'factor': 4.0}}))
    with pytest.raises(ExportError, match="RoPE type 'yarn'"): export_gguf(tmp_path/'yarn', tmp_path/'y.gguf')
    (tmp_path/'no_tok').mkdir(); (tmp_path/'no_tok'/'config.json').write_text(json.dumps(rope))
    with pytest.raises(ExportError, match='no loadable tokenizer'): export_gguf(tmp_path/'no_tok', tmp_path/'n.gguf')
    assert not list(tmp_path.glob('*.gguf'))


def _variant(adapter, dest, **changes):
    "A copy of `adapter` with `changes` in its adapter_config.json"
    import shutil
    shutil.copytree(adapter, dest)
    (dest/'adapter_config.json').write_text(json.dumps({**json.loads((adapter/'adapter_config.json').read_text()), **changes}))
    return dest


def test_lora_refusals(stand_in, tmp_path):
    "What llama.cpp could not apply as trained, and an adapter for another base, are refused before anything is written"
    adapter = stand_in[0]
    assert issubclass(ExportError, LoraNbError) and issubclass(AdapterError, LoraNbError)
    assert check_gguf_lora(adapter)['r'] == 8
    with pytest.raises(ExportError, match="DoRA"): export_lora_gguf(_variant(adapter, tmp_path/'dora', use_dora=True), tmp_path/'d.gguf')
    with pytest.raises(ExportError, match=r"modules_to_save \['lm_head'\]"):
        export_lora_gguf(_variant(adapter, tmp_path/'mts', modules_to_save=['lm_head']), tmp_path/'m.gguf')
    with pytest.raises(AdapterError, match="not 'LORA'"): check_gguf_lora(_variant(adapter, tmp_path/'ia3', peft_type='IA3'))
    with pytest.raises(AdapterError, match=r"does not fit this base \(LlamaForCausalLM, hidden size 576, 30 layers\)"):
        export_lora_gguf(adapter, tmp_path/'w.gguf', base='smollm2-135m')
    (tmp_path/'no_base').mkdir()
    with pytest.raises(AdapterError, match='base_model_name_or_path is empty'):
        export_lora_gguf(_variant(adapter, tmp_path/'no_base'/'a', base_model_name_or_path=None), tmp_path/'n.gguf')
    assert not list(tmp_path.glob('*.gguf')) and not list(tmp_path.glob('.*.tmp'))


def _modelfile_parts(text):
    "(TEMPLATE, SYSTEM or None, [stop strings]) of a Modelfile's text"
    block = lambda key: text.split(f'{key} """')[1].split('"""')[0] if f'{key} """' in text else None
    return block('TEMPLATE'), block('SYSTEM'), [l.split('"')[1] for l in text.splitlines() if l.startswith('PARAMETER stop ')]


def test_modelfile(stand_in, tmp_path):
    f = export_for_ollama(stand_in[1], tmp_path/'ticket.gguf', 'q8_0', CFG)
    assert f == tmp_path/'ticket.gguf' and gguf_metadata(f)['general.file_type'] == 7  # MOSTLY_Q8_0
    text = (tmp_path/'Modelfile').read_text()
    assert 'FROM ./ticket.gguf\n' in text and 'PARAMETER stop "<|im_end|>"\nPARAMETER stop "###"\n' in text
    assert f'SYSTEM """{TASKS["tickets"]["instruction"]}"""' in text and 'PARAMETER temperature 0\n' in text
    tpl, system, _ = _modelfile_parts(text)
    r = RECORDS[0]
    assert tpl == OLLAMA_ALPACA and system == r['instruction']
    assert render_go_template(tpl, System=system, Prompt=r['input']) == build_prompt(r, 'alpaca')
    assert render_go_template(tpl, Prompt='Say hi.') == build_prompt(dict(instruction='Say hi.', input=''), 'alpaca')
    sampled = load_config(profile='fast', overrides=['eval.do_sample=true', 'eval.temperature=0.3', 'eval.top_p=0.8'])
    text = write_modelfile(f, stand_in[3], sampled).read_text()
    assert 'PARAMETER temperature 0.3\nPARAMETER top_p 0.8\n' in text


# a system message, two user/assistant exchanges and a final user turn
CONVO = [dict(role='system', content='You are a support agent.\nReply in JSON when you can.'),
         dict(role='user', content='My parcel never came.'), dict(role='assistant', content='Sorry! What is the order number?'),
         dict(role='user', content='It is #58392, ordered on 3 May.'), dict(role='assistant', content='{"intent": "order_status", "order_id": 58392}'),
         dict(role='user', content='Any news? It is urgent!')]
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
LLAMA2 = ("{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% set sys = messages[0]['content'] %}{% else %}"
          "{% set rest = messages %}{% set sys = false %}{% endif %}{% for m in rest %}{% if loop.index0 == 0 and sys != false %}"
          "{% set c = '<<SYS>>\n' + sys + '\n<</SYS>>\n\n' + m['content'] %}{% else %}{% set c = m['content'] %}{% endif %}"
          "{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + c.strip() + ' [/INST]' }}{% else %}{{ ' ' + c.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")


def _with_template(model_dir, template, eos=None):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = template
    if eos: tok.eos_token = eos
    return tok


def test_gguf_holds_chat_template_and_end_of_turn(stand_in, f32_file, tmp_path):
    "Read back with GGUFReader: the chat template, the EOS and the end-of-turn id are the tokenizer's"
    tok = stand_in[3]
    md = gguf_metadata(f32_file)
    assert md['tokenizer.chat_template'] == tok.chat_template
    assert md['tokenizer.ggml.eos_token_id'] == tok.eos_token_id == tok.convert_tokens_to_ids('<|im_end|>')
    assert md['tokenizer.ggml.eot_token_id'] == tok.convert_tokens_to_ids(end_of_turn(tok)) == tok.convert_tokens_to_ids('<|im_end|>')
    # EOS and end of turn apart: the end of turn comes from the template, not from the EOS
    import shutil
    d = tmp_path/'chatml'; shutil.copytree(stand_in[1], d)
    _with_template(d, CHATML, eos='<|endoftext|>').save_pretrained(d)
    md = gguf_metadata(export_gguf(d, tmp_path/'chatml.gguf'))
    assert (md['tokenizer.ggml.eos_token_id'], md['tokenizer.ggml.eot_token_id'], md['tokenizer.chat_template']) == (
        tok.convert_tokens_to_ids('<|endoftext|>'), tok.convert_tokens_to_ids('<|im_end|>'), CHATML)
    # no special token closes the turn: no end-of-turn id; nothing closes it: refused, nothing written
    dashes = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n--\n' }}{% endfor %}"
    assert end_of_turn_id(_with_template(d, dashes)) is None
    assert 'tokenizer.ggml.eot_token_id' not in tokenizer_metadata(_with_template(d, dashes), 49152)
    _with_template(d, "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\n\n' }}{% endfor %}").save_pretrained(d)
    with pytest.raises(ExportError, match='no end-of-turn marker'): export_gguf(d, tmp_path/'blank.gguf')
    assert not (tmp_path/'blank.gguf').exists()


def _ollama_text(o, msgs): return render_go_template(o['template'], **ollama_values(msgs, o['system']))


def _jinja_text(tok, msgs): return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_chat_modelfile_renders_the_jinja_template(stand_in, tmp_path):
    "template = chat: the Modelfile's TEMPLATE, SYSTEM and stop lines, rendered as Ollama would, give the chat template's text"
    tok = load_tokenizer('tiny')  # SmolLM2's tokenizer and template (a default system message)
    chat = load_config(profile='fast', overrides=['data.template=chat'])
    text = write_modelfile(tmp_path/'m.gguf', tok, chat).read_text()
    tpl, system, stop = _modelfile_parts(text)
    assert '{{ range .Messages }}' in tpl and '{{ if .System }}' in tpl and 'eq .Role "user"' in tpl
    assert system == 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' and stop == ['<|im_end|>']
    o = dict(template=tpl, system=system)
    for msgs in (CONVO, CONVO[1:], CONVO[1:2]):
        assert _ollama_text(o, msgs) == _jinja_text(tok, msgs) == build_prompt(dict(messages=msgs), 'chat', tok)
    r = RECORDS[0]  # an instruction record: the user's message is the instruction, a blank line, the input
    assert _ollama_text(o, [dict(role='user', content=f"{r['instruction']}\n\n{r['input']}")]) == build_prompt(r, 'chat', tok)
    # ChatML without a default system message, and a Llama 3 style template
    for template, want_system, want_stop in ((CHATML, None, ['<|im_end|>']), (LLAMA3, None, ['<|eot_id|>', '<|im_end|>'])):
        t = _with_template(stand_in[1], template)
        o = ollama_chat_template(t)
        assert (o['system'], o['stop']) == (want_system, want_stop)
        for msgs in (CONVO, CONVO[1:]): assert _ollama_text(o, msgs) == _jinja_text(t, msgs)
        assert '<|im_start|>system' not in _ollama_text(o, CONVO[1:])
    # Llama 2 writes the system message inside the first user turn: the Go template follows it, with and without one
    o = ollama_chat_template(_with_template(stand_in[1], LLAMA2))
    assert o['system_mode'] == 'folded' and '{{ if and $.System (eq $i 1) }}' in o['template']
    for msgs in (CONVO, CONVO[1:], CONVO[:2]): assert _ollama_text(o, msgs) == _jinja_text(_with_template(stand_in[1], LLAMA2), msgs)


def test_chat_modelfile_refusals(stand_in, tmp_path):
    "A chat template the Go template cannot follow is refused, and no Modelfile is written"
    chat = load_config(profile='fast', overrides=['data.template=chat'])
    assert "m['role'] + '\n'" in CHATML
    numbered = CHATML.replace("m['role'] + '\n'", "m['role'] + ' ' + loop.index|string + '\n'")  # turns numbered: caught by the check
    history = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] }}{% if not loop.last %}{{ '<|im_end|>\n' }}{% endif %}"
               "{% endfor %}")
    for template, why in ((numbered, 'chat_template: '),
                          (history, 'a one-message chat does not end with its user turn'), (None, 'a chat template; this one has none')):
        with pytest.raises(ExportError, match=why): write_modelfile(tmp_path/'m.gguf', _with_template(stand_in[1], template), chat)
    assert not (tmp_path/'Modelfile').exists()


def test_chat_template_check_catches_a_wrong_piece(stand_in, monkeypatch):
    "The last line of defence: pieces that render one message wrong are caught by the four-chat check"
    import lora_nb.deploy as dp
    tok, real = stand_in[3], dp._chat_pieces
    assert ollama_chat_template(tok)['system']
    monkeypatch.setattr(dp, '_chat_pieces', lambda t: real(t) | dict(asst_suf='<|im_end|>'))  # the newline after an assistant turn lost
    with pytest.raises(ExportError, match="differs at character"): ollama_chat_template(tok)


def test_go_template_subset():
    tpl = ('{{ if .System }}S:{{ .System }};{{ end }}{{ range .Messages }}{{ if eq .Role "user" }}U:{{ .Content }};'
           '{{ else if eq .Role "assistant" }}A:{{ .Content }};{{ else }}?{{ end }}{{ else }}empty{{ end }}>')
    msgs = [dict(role='system', content='s'), dict(role='user', content='a'), dict(role='assistant', content='b'), dict(role='tool', content='c')]
    assert render_go_template(tpl, **ollama_values(msgs)) == 'S:s;?U:a;A:b;?>'  # Ollama's .Messages keep the system message
    assert render_go_template(tpl, Messages=[]) == 'empty>'
    assert ollama_values([dict(role='user', content='a'), dict(role='user', content='b')], 'sys') == dict(
        System='sys', Messages=[dict(role='system', content='sys'), dict(role='user', content='a\n\nb')])
    assert render_go_template('{{ range $i, $m := .Messages }}{{ if eq .Role "user" }}{{ if and $.System (eq $i 1) }}[{{ $.System }}]{{ end }}'
                              '{{ $m.Content }}{{ end }}{{ end }}',
                              **ollama_values(msgs[1:2], 'sys')) == '[sys]a'  # variables, $ and and/eq, as a folded system message needs
    for bad in ('{{ if .System }}x', '{{ end }}', '{{- .System }}', '{{ $x := .System }}', '{{ .System | html }}', '{{ $nope }}'):
        with pytest.raises(ValueError): render_go_template(bad, System='x')


def _lora_matches_merged(adapter_dir, merged_dir, tmp_path):
    "max |base + alpha/r * B @ A - merged| over the adapted matrices, all in llama.cpp's layout, A/B/alpha read from the file"
    lora = export_lora_gguf(adapter_dir, tmp_path/'adapter.gguf')
    md = gguf_metadata(lora)
    assert (md['general.type'], md['adapter.type'], md['general.architecture']) == ('adapter', 'lora', 'llama')
    lt = {t.name: np.array(t.data) for t in GGUFReader(lora).tensors}
    c = read_model_config(merged_dir)
    base = {n: load for n, _, load in llama_gguf_tensors(resolve_model('tiny'), c)}
    merged = {n: load for n, _, load in llama_gguf_tensors(merged_dir, c)}
    assert len(lt) == 2 * 7 * 2
    worst = 0.0
    for name in merged:
        if name + '.lora_a' in lt:
            A, B = lt[name + '.lora_a'], lt[name + '.lora_b']
            assert A.shape[0] == 8 and B.shape[1] == 8 and A.shape[1] == base[name]().shape[1] and B.shape[0] == base[name]().shape[0]
            worst = max(worst, float(np.abs(base[name]() + md['adapter.lora.alpha'] / A.shape[0] * B @ A - merged[name]()).max()))
    return md, worst


def test_lora_file_reads_back(stand_in, tmp_path):
    md, worst = _lora_matches_merged(stand_in[0], stand_in[1], tmp_path)
    assert md['adapter.lora.alpha'] == 16.0 and worst < 1e-5


def test_rslora_scale_is_folded_into_b(tmp_path):
    "rsLoRA scales by alpha/sqrt(r); llama.cpp by alpha/r: the file must still reproduce the merged model"
    adapter, merged_dir, _, _ = _stand_in(tmp_path, use_rslora=True)
    assert json.loads((adapter/'adapter_config.json').read_text())['use_rslora']
    _, worst = _lora_matches_merged(adapter, merged_dir, tmp_path)
    assert worst < 1e-5


def _tokenizer_round_trip(tok, model_dir, vocab_size, tmp_path, probe, **config):
    "Save a random tiny Llama with `tok`, export it, check what transformers reads back; returns (metadata, file)"
    from transformers import AutoModelForCausalLM
    from lora_nb.models import tiny_config
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(tiny_config(vocab_size=vocab_size, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                                     pad_token_id=tok.pad_token_id, **config)).eval()
    m.save_pretrained(model_dir); tok.save_pretrained(model_dir)
    f = export_gguf(model_dir, tmp_path/'tok.gguf', 'f32')
    g, gtok = load_gguf(f)
    assert [gtok(s)['input_ids'] for s in probe] == [tok(s)['input_ids'] for s in probe]
    ids = tok(probe[0], return_tensors='pt')['input_ids']
    with torch.no_grad(): assert (m(ids).logits - g(ids).logits).abs().max().item() <= 1e-4
    return gguf_metadata(f, max_items=None), f


PROBE = ["Hello World 12345 ticket  two  spaces\n\nnew line café 😀", "\n\nHello  \n  x", "I'VE got 3 orders: #58392, #11111!", "日本語 ß ∑ \t tab",
         "Triage this support ticket. Reply with JSON: intent, order_id, urgent."]


def test_sentencepiece_tokenizer_llama2_style(tmp_path):
    "A Llama 2 style tokenizer (SentencePiece BPE, byte fallback): scores and token types as SentencePiece's own"
    import sentencepiece as spm
    from transformers import AutoTokenizer
    text = [r['instruction'] + '\n' + r['input'] + '\n' + r['output'] for r in read_records(data_path(CFG.data.train_file))]
    src = tmp_path/'spm'; src.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text), model_prefix=str(src/'tokenizer'), vocab_size=1000, model_type='bpe',
                                   byte_fallback=True, character_coverage=1.0, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
                                   split_digits=True, normalization_rule_name='identity', remove_extra_whitespaces=False,
                                   minloglevel=2)  # Llama 2's settings: no Unicode normalization
    (src/'tokenizer_config.json').write_text(json.dumps(dict(tokenizer_class='LlamaTokenizer', bos_token='<s>', eos_token='</s>',
                                                              unk_token='<unk>', add_bos_token=True)))
    tok = AutoTokenizer.from_pretrained(src)
    md, f = _tokenizer_round_trip(tok, tmp_path/'model', 1000, tmp_path, PROBE, tie_word_embeddings=False)  # as Llama 2
    assert 'output.weight' in [t['name'] for t in gguf_tensor_table(f)]
    sp = spm.SentencePieceProcessor(model_file=str(src/'tokenizer.model'))
    if llama_cpp_status() is None:  # llama.cpp's own SentencePiece-style tokenizer, driven by the scores we wrote
        assert llama_cpp_tokenize(f, PROBE) == [sp.encode(s) for s in PROBE]
    assert (md['tokenizer.ggml.model'], md['tokenizer.ggml.pre'], md['tokenizer.ggml.add_bos_token'], md['tokenizer.ggml.add_space_prefix']) == ('llama', 'default', True, True)
    assert md['tokenizer.ggml.tokens'] == [sp.IdToPiece(i) for i in range(1000)]
    assert md['tokenizer.ggml.scores'] == [sp.GetScore(i) for i in range(1000)]
    assert md['tokenizer.ggml.token_type'] == [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(1000)]
    # a tokenizer that normalizes Unicode (NFKC) has no GGUF equivalent: llama.cpp does not normalize, so it is refused
    from tokenizers import normalizers
    from transformers import PreTrainedTokenizerFast
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.normalizer = normalizers.NFKC()
    nfkc = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token='<s>', eos_token='</s>', unk_token='<unk>')
    with pytest.raises(ExportError, match=r"normalizer \['NFKC'\]"): tokenizer_metadata(nfkc, 1000)


def test_llama3_pre_tokenizer(stand_in, tmp_path):
    "A Llama 3 style pre-tokenizer (its split regex, then byte-level) is named llama-bpe and survives the round trip"
    from tokenizers import Regex, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    tok = stand_in[3]
    backend = tok.backend_tokenizer.__class__.from_str(tok.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(GGUF_PRE_TOKENIZER_SPLITS['llama-bpe']), 'isolated'),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    l3 = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=tok.bos_token, eos_token=tok.eos_token,
                                 unk_token=tok.unk_token, pad_token=tok.pad_token)
    assert l3('\n\nHello')['input_ids'] != tok('\n\nHello')['input_ids']  # the regex matters for this text
    md, _ = _tokenizer_round_trip(l3, tmp_path/'model', 49152, tmp_path, PROBE)
    assert md['tokenizer.ggml.pre'] == 'llama-bpe'


def test_llama_cpp_runs_the_files(stand_in, f32_file, tmp_path):
    reason = llama_cpp_status()
    if reason: pytest.skip(reason)
    adapter, merged_dir, merged, tok = stand_in
    prompts = _prompts(tok)
    assert llama_cpp_tokenize(f32_file, PROBE + prompts) == [tok(s)['input_ids'] for s in PROBE + prompts]
    want = transformers_greedy_ids(merged, tok, prompts, 16)
    assert llama_cpp_generate(f32_file, prompts, 16) == want
    base = export_gguf(resolve_model('tiny'), tmp_path/'base.gguf', 'f32')
    assert llama_cpp_generate(base, prompts, 16, lora=export_lora_gguf(adapter, tmp_path/'a.gguf')) == want

"Your own data (lora_nb.data, nbs/04_data.ipynb; lora_nb.infer, nbs/11_inference.ipynb): formats, their errors, masks proved on three chat templates, train/inference prompt equality, scoring and loss."
import copy, csv, dataclasses, json, math, os, subprocess, sys
from pathlib import Path

import pytest

from lora_nb.config import DataCfg, load_config
from lora_nb.data import (
    FORMATS, TemplateError, build_prompt, collator_for, conversation_example, detect_format, end_of_turn, mask_view,
    prepare_examples, prompt_ids, read_records, reference_answer, text_examples, to_messages, token_stats, tokenize_example,
    tokenize_records, validate_records)
from lora_nb.tasks import DataError

ROOT = Path(__file__).resolve().parents[1]
LORA_NB = str(Path(sys.executable).parent/'lora-nb')

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
          "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
          "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Phi-3 style: an EOS closes a chat only when no reply is asked for (render_chat leaves it out: it belongs to no turn)
PHI3 = ("{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
PHI3_TOKENS = ['<|system|>', '<|user|>', '<|assistant|>', '<|end|>']
LLAMA3_TOKENS = ['<|begin_of_text|>', '<|start_header_id|>', '<|end_header_id|>', '<|eot_id|>']


def msgs(*turns):
    return [dict(role=r, content=c) for r, c in turns]


CONVERSATIONS = [
    msgs(('user', 'Where is order 58392?'), ('assistant', 'It ships today.')),
    msgs(('system', 'You triage tickets.'), ('user', 'Where is order 58392?'), ('assistant', 'Which day did you order it?'),
         ('user', 'Monday, I think.'), ('assistant', '{"intent":"shipping_delay","order_id":"58392","urgent":false}')),
    msgs(('user', 'Hi'), ('assistant', 'Hello!\n\nHow can I help?'), ('user', 'Refund, order #12345.'),
         ('assistant', 'Done: 12345 is refunded.'), ('user', 'Thanks'), ('assistant', 'You are welcome.')),
]


@pytest.fixture(scope='module')
def tok():
    from lora_nb.models import load_tokenizer
    return load_tokenizer('tiny')


@pytest.fixture(scope='module')
def templates(tok):
    "name -> (tokenizer, its end-of-turn token): SmolLM2's own template, ChatML (OpenHermes), Llama 3, Phi-3 (a closing EOS)"
    chatml = copy.deepcopy(tok); chatml.chat_template = CHATML
    llama3 = copy.deepcopy(tok); llama3.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    llama3.chat_template, llama3.bos_token = LLAMA3, '<|begin_of_text|>'
    phi3 = copy.deepcopy(tok); phi3.add_tokens(PHI3_TOKENS, special_tokens=True); phi3.chat_template = PHI3
    return {'smollm2': (tok, '<|im_end|>'), 'chatml': (chatml, '<|im_end|>'), 'llama3': (llama3, '<|eot_id|>'), 'phi3': (phi3, '<|end|>')}


def runs(labels):
    "The supervised stretches of `labels` as lists of ids"
    out, prev = [], -100
    for l in labels:
        if l != -100: (out[-1].append(l) if prev != -100 else out.append([l]))
        prev = l
    return out


def write_jsonl(path, recs):
    path.write_text(''.join(json.dumps(r) + '\n' for r in recs))
    return path


# --- formats ----------------------------------------------------------------------------------------------------

def test_settings_choices_are_the_formats():
    f = {x.name: x for x in dataclasses.fields(DataCfg)}
    assert f['format'].metadata['choices'] == ('auto', *FORMATS)
    assert f['train_on'].metadata['choices'] == ('all_assistant', 'last_assistant')
    d = load_config(profile='').data
    assert (d.format, d.train_on) == ('auto', 'all_assistant')


def test_detect_format_from_every_file_type(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    chat = dict(messages=CONVERSATIONS[0])
    write_jsonl(tmp_path/'c.jsonl', [chat])
    (tmp_path/'s.json').write_text(json.dumps([dict(conversations=[dict(zip(('from', 'value'), t)) for t in [('human', 'Hi'), ('gpt', 'Hello')]])]))
    pq.write_table(pa.Table.from_pylist([chat, chat]), tmp_path/'c.parquet')
    with open(tmp_path/'t.csv', 'w', newline='') as f: csv.writer(f).writerows([['text'], ['A document.'], ['Another one.']])
    with open(tmp_path/'p.csv', 'w', newline='') as f: csv.writer(f).writerows([['prompt', 'completion'], ['Q: 1+1=', ' 2']])
    got = {p: detect_format(tmp_path/p) for p in ['c.jsonl', 's.json', 'c.parquet', 't.csv', 'p.csv']}
    assert got == {'c.jsonl': 'conversations', 's.json': 'conversations', 'c.parquet': 'conversations', 't.csv': 'text', 'p.csv': 'prompt_completion'}
    assert detect_format([dict(instruction='a', input='b', output='c', text='the formatted prompt')]) == 'instruction'  # tatsu-lab/alpaca has `text`


def test_format_errors_name_file_line_and_fields(tmp_path):
    p = write_jsonl(tmp_path/'mixed.jsonl', [dict(text='a'), dict(text='b'), dict(prompt='p', completion='c', id=3)])
    with pytest.raises(DataError, match=r"mixed.jsonl, line 3: a prompt_completion record \(fields prompt, completion, id\) in a file of text records \(from line 1\)"):
        detect_format(p)
    p = write_jsonl(tmp_path/'odd.jsonl', [dict(question='q', answer='a')])
    with pytest.raises(DataError, match=r"odd.jsonl, line 1: fields question, answer match no format"): detect_format(p)
    with pytest.raises(DataError, match=r"odd.jsonl, line 1: fields question, answer match no format"): validate_records(p)
    assert validate_records(p, raise_errors=False).errors[0].startswith(f"{p}, line 1: fields question, answer")
    (tmp_path/'empty.jsonl').write_text('\n\n')
    with pytest.raises(DataError, match=r"empty.jsonl: no records"): validate_records(tmp_path/'empty.jsonl')


def test_empty_training_file_is_named_not_a_sampler_crash(tmp_path, tok):
    (tmp_path/'empty.jsonl').write_text('')
    cfg = load_config(profile='fast', overrides=[f"data.train_file={tmp_path/'empty.jsonl'}", f"data.val_file={ROOT/'data'/'tickets_val.jsonl'}"])
    with pytest.raises(DataError, match=r"empty.jsonl: no records"): prepare_examples(cfg, tok)


def test_role_errors_point_into_the_conversation(tmp_path):
    recs = [dict(messages=c) for c in CONVERSATIONS]
    recs += [dict(messages=CONVERSATIONS[1][:1] + [dict(role='user', content=f'question {i}'), dict(role='assistant', content='ok')]) for i in range(3)]
    recs.append(dict(messages=CONVERSATIONS[1][:3] + [dict(role='asistant', content='oops')] + CONVERSATIONS[1][4:]))  # line 7
    recs.append(dict(messages=[dict(role='user', content='Hi'), dict(content='Hello')]))
    recs.append(dict(messages=[dict(role='user', content=None), dict(role='assistant', content='Hello')]))
    recs.append(dict(messages='Hi'))
    recs.append(dict(messags=CONVERSATIONS[0]))
    p = write_jsonl(tmp_path/'chats.jsonl', recs)
    rep = validate_records(p, raise_errors=False, fmt='conversations')
    assert [e.removeprefix(f"{p}, ") for e in rep.errors] == [
        "line 7, messages[3]: role 'asistant' is not one of system, user, assistant",
        "line 8, messages[1]: no 'role' field (fields: content)",
        "line 9, messages[0]: content must be text, got NoneType None",
        "line 10, field 'messages': must be a non-empty list of messages, got str 'Hi'",
        "line 11, field 'messages': missing (found 'messags': misspelled?)"]
    with pytest.raises(DataError, match=r"5 problem\(s\) in .*chats.jsonl:\n.*chats.jsonl, line 7, messages\[3\]: role 'asistant'"):
        validate_records(p, fmt='conversations')


def test_sharegpt_maps_to_messages():
    rec = dict(conversations=[dict(zip(('from', 'value'), t)) for t in [('system', 'Be brief.'), ('human', 'Hi'), ('gpt', 'Hello')]])
    assert to_messages(rec) == msgs(('system', 'Be brief.'), ('user', 'Hi'), ('assistant', 'Hello'))
    bad = dict(conversations=[dict(zip(('from', 'value'), t)) for t in [('human', 'Hi'), ('assistant', 'Hello')]])
    assert validate_records([rec, bad], raise_errors=False).errors == [
        "<list>, record 2, conversations[1]: from 'assistant' is not one of human, gpt, system"]


def test_conversations_without_assistant_and_duplicates_are_errors(tok):
    recs = [dict(messages=CONVERSATIONS[0]), dict(messages=CONVERSATIONS[0][:1]), dict(messages=CONVERSATIONS[0])]
    assert validate_records(recs, tok, raise_errors=False).errors == [
        "<list>, record 2: no assistant turn: nothing to learn", "<list>, record 3: duplicate of record 1"]


# --- the mask, proved on four templates ----------------------------------------------------------------------------

@pytest.mark.parametrize('name', ['smollm2', 'chatml', 'llama3', 'phi3'])
@pytest.mark.parametrize('conv', range(len(CONVERSATIONS)))
@pytest.mark.parametrize('train_on', ['all_assistant', 'last_assistant'])
def test_learned_tokens_are_each_assistant_turn_and_its_end(templates, name, conv, train_on):
    t, eot = templates[name]
    messages = CONVERSATIONS[conv]
    ex = conversation_example(messages, t, train_on)
    answers = [m['content'] for m in messages if m['role'] == 'assistant']
    expected = answers if train_on == 'all_assistant' else answers[-1:]
    assert [t.decode(r) for r in runs(ex['labels'])] == [a + eot for a in expected]
    assert all(l in (-100, i) for i, l in zip(ex['input_ids'], ex['labels']))           # nothing else is learned
    assert len(ex['input_ids']) == len(ex['labels'])
    # the context renders the template: system/user turns are all there, and masked
    text = t.decode(ex['input_ids'])
    assert all(m['content'] in text for m in messages)
    masked = t.decode([i for i, l in zip(ex['input_ids'], ex['labels']) if l == -100])
    assert all(m['content'] in masked for m in messages if m['role'] != 'assistant')


@pytest.mark.parametrize('name', ['smollm2', 'chatml', 'llama3', 'phi3'])
def test_inference_prompt_ids_equal_training_ids_up_to_the_first_learned_token(templates, name):
    t, _ = templates[name]
    for messages in CONVERSATIONS:
        for rec in (dict(messages=messages), dict(prompt=messages[:-1], completion=messages[-1:])):
            ex = tokenize_example(rec, t, 'alpaca', 4096)
            first = len(ex['labels']) - len(runs(ex['labels'])[-1])
            assert prompt_ids(rec, t) == ex['input_ids'][:first]
            assert t(build_prompt(rec, 'alpaca', t), add_special_tokens=False)['input_ids'] == ex['input_ids'][:first]


def test_end_of_turn_of_each_template(templates):
    from lora_nb.infer import stop_token_ids
    for name, (t, eot) in templates.items():
        assert end_of_turn(t) == eot
    llama3 = templates['llama3'][0]
    assert stop_token_ids(llama3) == [llama3.eos_token_id, llama3.convert_tokens_to_ids('<|eot_id|>')]


def test_smollm2_default_system_prompt_is_masked_context(tok):
    ex = conversation_example(CONVERSATIONS[0], tok)
    masked = tok.decode([i for i, l in zip(ex['input_ids'], ex['labels']) if l == -100])
    assert masked.startswith('<|im_start|>system\nYou are a helpful AI assistant named SmolLM')
    # a conversation that opens with the assistant has nothing to render before its first turn
    opens = dict(messages=msgs(('assistant', 'Hello, how can I help?'), ('user', 'Hi'), ('assistant', 'Hi!')))
    assert validate_records([opens], tok, raise_errors=False).errors == [
        "<list>, record 1: messages[0]: the conversation opens with an assistant turn; a user or system turn must come first"]


def test_templates_that_cannot_be_split_are_named_errors(tok, tmp_path):
    drops = copy.deepcopy(tok)
    drops.chat_template = ("{% for m in messages %}{% set c = m['content'] %}{% if m['role'] == 'assistant' and not loop.last %}"
                           "{% set c = c.split('</think>')[-1].lstrip() %}{% endif %}{{ '<|im_start|>' + m['role'] + '\n' + c + '<|im_end|>\n' }}"
                           "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    thinking = msgs(('user', 'Where is 58392?'), ('assistant', '<think>Look.</think>Today.'), ('user', 'Thanks'), ('assistant', 'Welcome.'))
    with pytest.raises(TemplateError, match=r"messages\[1\]: the chat template renders"): conversation_example(thinking, drops)
    assert issubclass(TemplateError, DataError)
    counts = copy.deepcopy(tok)  # a header that counts the messages: no prefix renders like the whole
    counts.chat_template = "{{ messages|length }} messages\n" + CHATML
    p = write_jsonl(tmp_path/'c.jsonl', [dict(messages=CONVERSATIONS[0])])
    with pytest.raises(DataError, match=r"c.jsonl, line 1: messages\[1\]: the chat template renders"):
        validate_records(p, counts)
    no_end = copy.deepcopy(tok); no_end.chat_template = CHATML.replace("+ '<|im_end|>'", '')
    with pytest.raises(TemplateError, match='no end-of-turn marker'): conversation_example(CONVERSATIONS[0], no_end)
    no_template = copy.deepcopy(tok); no_template.chat_template = None
    with pytest.raises(TemplateError, match='need a tokenizer with a chat template'): tokenize_example(dict(messages=CONVERSATIONS[0]), no_template)


def test_truncation_of_conversations(tok):
    long_first = msgs(('user', 'word ' * 60), ('assistant', 'short answer'))
    rep = validate_records([dict(messages=CONVERSATIONS[1]), dict(messages=long_first)], tok, max_length=48, raise_errors=False)
    assert len(rep.errors) == 1 and rep.errors[0].startswith("<list>, record 2: the first supervised token is at position")
    assert 'past max_length=48: nothing would be learned' in rep.errors[0]
    (t,) = rep.truncated   # record 1 keeps its first answer, loses the last
    full = tokenize_example(dict(messages=CONVERSATIONS[1]), tok, max_length=4096)
    kept = tokenize_example(dict(messages=CONVERSATIONS[1]), tok, max_length=48)
    assert t['where'] == '<list>, record 1' and t['tokens'] == len(full['input_ids']) and t['over'] == t['tokens'] - 48
    assert t['response_tokens_lost'] == sum(l != -100 for l in full['labels']) - sum(l != -100 for l in kept['labels']) > 0
    with pytest.raises(DataError, match=r"record 2: the first supervised token"):
        tokenize_records([dict(messages=CONVERSATIONS[0]), dict(messages=long_first)], tok, max_length=48)


# --- prompt/completion and text ---------------------------------------------------------------------------------

def test_prompt_completion_masks(templates):
    tok = templates['smollm2'][0]
    text = tokenize_example(dict(prompt='Q: 2 + 3 =', completion=' 5'), tok)
    assert tok.decode(text['input_ids']) == 'Q: 2 + 3 = 5' + tok.eos_token
    assert [tok.decode(r) for r in runs(text['labels'])] == [' 5' + tok.eos_token]
    assert text['input_ids'][:len(prompt_ids(dict(prompt='Q: 2 + 3 =', completion=' 5'), tok))] == tok('Q: 2 + 3 =', add_special_tokens=False)['input_ids']
    for name, (t, eot) in templates.items():
        chat = tokenize_example(dict(prompt='2 + 3?', completion='5'), t, 'chat')
        assert [t.decode(r) for r in runs(chat['labels'])] == ['5' + eot]
        as_messages = dict(prompt=CONVERSATIONS[1][:-1], completion=dict(role='assistant', content='Noted.'))
        ex = tokenize_example(as_messages, t, 'alpaca', train_on='all_assistant')   # only the completion, whatever train_on
        assert [t.decode(r) for r in runs(ex['labels'])] == ['Noted.' + eot]
    assert reference_answer(as_messages) == 'Noted.'


def test_text_is_learned_everywhere_and_split_not_cut(tok):
    doc = dict(text=' '.join(f'Ticket {i} is about a late parcel.' for i in range(40)))
    n = len(tok(doc['text'], add_special_tokens=False)['input_ids']) + 1
    pieces = text_examples(doc, tok, 64)
    assert sum(len(p['input_ids']) for p in pieces) == n - (1 if n % 64 == 1 else 0)
    assert all(p['labels'] == p['input_ids'] and len(p['input_ids']) <= 64 for p in pieces)
    assert pieces[-1]['input_ids'][-1] == tok.eos_token_id
    short = dict(text='Refunds take five days.')
    ex = tokenize_records([doc, short], tok, max_length=64)
    assert len(ex) == len(pieces) + 1 and ex[-1] == text_examples(short, tok, 64)[0]
    assert not validate_records([doc, short], tok, max_length=64).truncated
    row = collator_for('padding_free', tok)(ex)
    lens = [len(e['input_ids']) for e in ex]
    assert row['position_ids'][0].tolist() == [p for k in lens for p in range(k)]      # attention stays in each piece
    assert int((row['labels'] != -100).sum()) == sum(lens) - len(lens)
    assert token_stats([doc, short], tok) == dict(prompt=[0, 0], response=[n, len(ex[-1]['input_ids'])])
    with pytest.raises(DataError, match='a text has no prompt'): build_prompt(short, 'alpaca', tok)


def test_mask_view(tok):
    assert mask_view(tokenize_example(dict(prompt='Q: 2 + 3 =', completion=' 5'), tok), tok) == 'Q: 2 + 3 =⟦ 5<|im_end|>⟧'


# --- seeing what trains: show_records, mask_html, data_report ----------------------------------------------------

def test_mask_view_styles_and_html(tok):
    import html, re
    from lora_nb.data import HTMLText, mask_html
    ex = tokenize_example(dict(messages=CONVERSATIONS[2]), tok)
    plain = mask_view(ex, tok)
    assert plain.count('⟦') == plain.count('⟧') == 3
    assert mask_view(ex, tok, 'ansi') == plain.replace('⟦', '\x1b[1;42;30m').replace('⟧', '\x1b[0m')
    page = mask_html(ex, tok)
    assert isinstance(page, HTMLText) and page._repr_html_() == str(page)
    learned = re.findall(r'<span class="learned"[^>]*>(.*?)</span>', page, re.S)
    assert [html.unescape(t) for t in learned] == ['Hello!\n\nHow can I help?<|im_end|>', 'Done: 12345 is refunded.<|im_end|>',
                                                   'You are welcome.<|im_end|>']
    assert html.unescape(re.sub(r'<[^>]+>', '', page)) == tok.decode(ex['input_ids'])
    assert '&lt;|im_start|&gt;' in page and '<|im_start|>' not in page   # the template's text is escaped, not taken for tags


def test_show_records(tmp_path, tok):
    from lora_nb.data import show_records
    bad = msgs(('user', 'Hi'), ('asistant', 'Hello'))
    f = write_jsonl(tmp_path/'c.jsonl', [dict(messages=CONVERSATIONS[0]), dict(messages=bad), dict(messages=CONVERSATIONS[1])])
    out = show_records(f, tok, n=2)
    blocks = out.split('\n\n── ')
    ex = tokenize_example(dict(messages=CONVERSATIONS[0]), tok)
    n, k = len(ex['input_ids']), sum(l != -100 for l in ex['labels'])
    assert blocks[0] == f"── {f}, line 1 · conversations · {n} tokens, {k} learned\n" + mask_view(ex, tok)
    assert blocks[1] == f"{f}, line 2 · conversations · cannot train\n  problem: messages[1]: role 'asistant' is not one of system, user, assistant"
    assert len(blocks) == 2                                                            # n=2 of 3 records
    cut = show_records([dict(messages=CONVERSATIONS[1])], tok, max_length=ex_len(tok, CONVERSATIONS[1]) - 3).splitlines()[0]
    assert cut.endswith(' · max_length=' + str(ex_len(tok, CONVERSATIONS[1]) - 3) + ' cuts 3 more tokens, 3 of them learned')
    doc = dict(text='word ' * 150)
    assert ' · 3 pieces of at most 64 tokens' in show_records([doc], tok, max_length=64)
    assert show_records([doc], tok, max_length=64).count('⋯ next piece ⋯') == 2
    page = show_records(f, tok, n=3, style='html')
    assert page.count('<pre') == 2 and page.count('<b>── ') == 3 and 'role &#x27;asistant&#x27;' in page
    with pytest.raises(DataError, match='no records'): show_records([], tok)


def ex_len(tok, messages):
    return len(tokenize_example(dict(messages=messages), tok, max_length=10**6)['input_ids'])


def test_data_report_counts_every_kind_of_problem(tmp_path, tok):
    from lora_nb.data import data_report, format_data_report, percentile
    recs = [dict(messages=c) for c in CONVERSATIONS] + [
        dict(messages=msgs(('user', 'Hi'), ('assistant', 'Hello'), ('user', 'Bye'), ('asistant', 'Bye!'))),   # line 4
        dict(messages=msgs(('system', 'Be brief.'), ('user', 'Hi'))),                                          # line 5
        dict(conversations=[{'from': 'human', 'value': 'Hi'}, {'from': 'robot', 'value': 'Hello'}]),         # line 6
        dict(messages=CONVERSATIONS[0])]                                                                      # line 7
    f = write_jsonl(tmp_path/'c.jsonl', recs)
    rep = data_report(f, tok, max_length=64)
    at = lambda xs: [x.removeprefix(f'{f}, ') for x in xs]
    assert at(rep['role_errors']) == ["line 4, messages[3]: role 'asistant' is not one of system, user, assistant",
                                      "line 6, conversations[1]: from 'robot' is not one of human, gpt, system"]
    assert at(rep['no_assistant']) == ['line 5: no assistant turn: nothing to learn']
    assert at(rep['duplicates']) == ['line 7: duplicate of line 1'] and len(rep['errors']) == 4 and not rep['ok']
    assert (rep['records'], rep['format'], rep['formats']) == (7, 'conversations', {'conversations': 7})
    full = [tokenize_example(r, tok, max_length=10**6) for r in recs[:3]]
    lengths = [len(e['input_ids']) for e in full]
    assert rep['tokens'] == dict(p50=percentile(lengths, 50), p90=percentile(lengths, 90), p99=percentile(lengths, 99), max=max(lengths))
    learned = lambda L: sum(l != -100 for r in recs[:3] for l in tokenize_example(r, tok, max_length=L)['labels'])
    assert (rep['supervised_tokens'], rep['supervised_lost']) == (learned(10**6), learned(10**6) - learned(64))
    assert rep['truncated'] == sum(n > 64 for n in lengths) and rep['supervised_lost_share'] == rep['supervised_lost'] / rep['supervised_tokens']
    text = format_data_report(rep).splitlines()
    assert text[0] == f'{f}: 7 records, format conversations (conversations 7)'
    assert "  line 4, messages[3]: role 'asistant' is not one of system, user, assistant" in text and '4 error(s):' in text
    assert 'duplicates: 1, without an assistant turn: 1, role errors: 2' in text
    assert format_data_report(rep, limit=1).splitlines()[-1] == '  ... and 3 more'
    json.dumps(rep)   # for `lora-nb data check --json`


def test_data_report_of_a_mixed_and_an_empty_file(tmp_path, tok):
    from lora_nb.data import data_report, format_data_report
    mixed = data_report([dict(messages=CONVERSATIONS[0]), dict(text='x'), dict(text='y')], tok)
    assert mixed['formats'] == {'conversations': 1, 'text': 2} and mixed['format'] is None and mixed['tokens'] is None
    assert 'one format per file' in mixed['errors'][0] and 'format unknown' in format_data_report(mixed)
    empty = data_report(write_jsonl(tmp_path/'e.jsonl', []), tok)
    assert empty['records'] == 0 and empty['errors'] == [f"{tmp_path/'e.jsonl'}: no records"]
    clean = data_report([dict(text='some words here')], tok)
    assert clean['ok'] and format_data_report(clean).splitlines()[-1] == 'no errors' and 'role errors' not in format_data_report(clean)


# --- the training path ----------------------------------------------------------------------------------------------

def test_prepare_examples_trains_the_files_format(tmp_path, tok):
    chats = write_jsonl(tmp_path/'chats.jsonl', [dict(messages=msgs(('user', f'Order {i}?'), ('assistant', f'Order {i} ships.'),
                                                                     ('user', 'When?'), ('assistant', 'Today.'))) for i in range(30)])
    base = [f'data.train_file={chats}', 'data.val_file=', 'data.test_file=']
    train, val = prepare_examples(load_config(profile='fast', overrides=base), tok)
    assert (len(train), len(val)) == (27, 3)
    assert all(len(runs(e['labels'])) == 2 for e in train + val)
    train, _ = prepare_examples(load_config(profile='fast', overrides=base + ['data.train_on=last_assistant']), tok)
    assert all([tok.decode(r) for r in runs(e['labels'])] == ['Today.<|im_end|>'] for e in train)
    with pytest.raises(DataError, match=r"chats.jsonl, line 1, field 'text': missing"):
        prepare_examples(load_config(profile='fast', overrides=base + ['data.format=text']), tok)


@pytest.mark.parametrize('kind', ['conversations', 'text'])
def test_lora_nb_train_on_a_users_file(tmp_path, kind):
    recs = read_records(ROOT/'data'/'tickets_train.jsonl')[:64]
    rows = ([dict(messages=msgs(('user', r['input']), ('assistant', r['output']))) for r in recs] if kind == 'conversations'
            else [dict(text=r['input']) for r in recs])
    f = write_jsonl(tmp_path/f'{kind}.jsonl', rows)
    cmd = [LORA_NB, 'train', '--name', kind, '--set', f'train.output_dir={tmp_path}', '--set', f'data.train_file={f}',
           '--set', 'data.val_file=', '--set', 'data.test_file=', '--set', 'train.max_steps=3', '--set', 'train.eval_steps=0',
           '--set', 'train.save_steps=0']
    r = subprocess.run(cmd, env={**os.environ, 'LORA_NB_PROFILE': 'fast'}, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    hist = json.loads((tmp_path/kind/'metrics.json').read_text())['log_history']
    losses = [h['loss'] for h in hist if 'loss' in h]
    assert len(losses) == 3 and all(math.isfinite(l) and l > 0 for l in losses)


# --- evaluation of a user's file ------------------------------------------------------------------------------------

def test_token_f1_and_score_text():
    from lora_nb.infer import score_text, token_f1
    assert token_f1('The cat sat', 'the cat sat!') == 1.0
    assert token_f1('a a b', 'a b b') == pytest.approx(2 * 2 / 6)
    assert token_f1('x', 'y') == 0.0 and token_f1('', '') == 1.0 and token_f1('', 'y') == 0.0
    assert score_text(' It ships\ntoday. ', 'It ships today.') == dict(exact_match=1, f1=1.0)
    assert score_text('it ships today.', 'It ships today.')['exact_match'] == 0


def test_score_responses_generic_for_user_files():
    from lora_nb.infer import score_responses
    pairs = [dict(prompt='Q: 2 + 3 =', completion=' 5'), dict(prompt='Q: 2 + 2 =', completion=' 4')]
    assert score_responses(['5', '5'], pairs) == dict(n=2, exact_match=0.5, f1=0.5)
    own = [dict(instruction='Say hi.', output='hi there')]
    assert score_responses(['hi\n\n### Instruction: more'], own, task='my-task') == dict(n=1, exact_match=0, f1=pytest.approx(2 / 3))
    with pytest.raises(DataError, match='does not end with an assistant turn'):
        score_responses(['x'], [dict(messages=msgs(('user', 'Hi')))])


@pytest.fixture(scope='module')
def tiny():
    from lora_nb.models import load_base
    return load_base('tiny')[0].eval()


def test_evaluate_generates_the_last_assistant_turn(tiny, tok, monkeypatch):
    from lora_nb import infer
    seen = []
    real = tiny.generate
    def spy(**kw): seen.append(kw['input_ids'][0].tolist()); return real(**kw)
    monkeypatch.setattr(tiny, 'generate', spy)
    conv = dict(messages=CONVERSATIONS[1])
    cfg = load_config(profile='fast')
    m = infer.evaluate(tiny, tok, [conv], cfg)
    assert set(m) == {'n', 'exact_match', 'f1', 'seconds'} and m['n'] == 1
    ex = tokenize_example(conv, tok, max_length=4096)
    assert seen == [ex['input_ids'][:len(ex['labels']) - len(runs(ex['labels'])[-1])]]
    with pytest.raises(DataError, match='text records have no answer'): infer.evaluate(tiny, tok, [dict(text='x y')], cfg)


def test_supervised_loss_is_the_token_mean_over_learned_tokens(tiny, tok):
    import torch, torch.nn.functional as F
    from lora_nb.infer import supervised_loss
    recs = [dict(messages=c) for c in CONVERSATIONS]
    cfg = load_config(profile='fast')
    got = supervised_loss(tiny, tok, recs, cfg)
    total = count = 0
    with torch.no_grad():
        for e in tokenize_records(recs, tok, max_length=cfg.data.max_length):
            logits = tiny(input_ids=torch.tensor([e['input_ids']])).logits[0, :-1].float()
            labels = torch.tensor(e['labels'][1:])
            total += float(F.cross_entropy(logits, labels, ignore_index=-100, reduction='sum')); count += int((labels != -100).sum())
    assert got['tokens'] == count and got['n'] == 3
    assert got['loss'] == pytest.approx(total / count, rel=1e-4) and got['perplexity'] == pytest.approx(math.exp(total / count), rel=1e-4)
    padded = supervised_loss(tiny, tok, recs, load_config(profile='fast', overrides=['data.batching=pad']))
    assert padded['loss'] == pytest.approx(got['loss'], rel=1e-4)


# --- chat: a conversation that keeps its history ------------------------------------------------------------------

def test_chat_second_prompt_holds_the_first_exchange(tiny, tok, monkeypatch):
    "Chat (template chat): the ids generated from for the 2nd message are prompt_ids of [user 1, answer 1, user 2]"
    import torch
    from lora_nb.infer import Chat
    seen = []
    real = tiny.generate
    def spy(**kw): seen.append(kw['input_ids'][0].tolist()); return real(**kw)
    monkeypatch.setattr(tiny, 'generate', spy)
    cfg = load_config(profile='fast', overrides=['data.template=chat', 'eval.do_sample=true', 'eval.temperature=1.0'])
    torch.manual_seed(0)
    chat = Chat(tiny, tok, cfg, system='You triage tickets.')
    first = chat.send('Where is order 58392?')
    second = chat.send('And order 12345?')
    assert first.strip() and first == first.strip()          # sampled from the random model: some text, stripped
    conv = msgs(('system', 'You triage tickets.'), ('user', 'Where is order 58392?'), ('assistant', first), ('user', 'And order 12345?'))
    assert seen[1] == prompt_ids(dict(messages=conv), tok, 'chat')
    assert seen[1][:len(seen[0])] == seen[0]                  # the second prompt extends the first
    assert f'<|im_start|>assistant\n{first}<|im_end|>' in tok.decode(seen[1])
    assert chat.messages == conv + [dict(role='assistant', content=second)]
    assert chat.prompt('Thanks') == build_prompt(dict(messages=chat.messages + msgs(('user', 'Thanks'))), 'chat', tok)


def test_chat_under_alpaca_answers_each_message_alone(tiny, tok):
    from lora_nb.infer import Chat
    chat = Chat(tiny, tok, load_config(profile='fast', overrides=['data.template=alpaca']), system='Triage this ticket.')
    chat.send('Where is order 58392?')
    assert not chat.multi_turn and len(chat.messages) == 2
    assert chat.prompt('And order 12345?') == build_prompt(dict(instruction='Triage this ticket.', input='And order 12345?', output=''))


def test_measure_is_loss_then_scores(tiny, tok):
    from lora_nb.infer import measure, supervised_loss
    cfg = load_config(profile='fast', overrides=['eval.limit=2'])
    recs = [dict(messages=c) for c in CONVERSATIONS]
    m = measure(tiny, tok, recs, cfg)
    assert list(m) == ['n', 'tokens', 'loss', 'perplexity', 'exact_match', 'f1', 'seconds'] and m['n'] == 2
    assert m['loss'] == supervised_loss(tiny, tok, recs[:2], cfg)['loss']
    assert list(measure(tiny, tok, [dict(text='a few words of text')], cfg)) == ['n', 'tokens', 'loss', 'perplexity']


# --- the shipped conversational task (nbs/03_tasks.ipynb: support_chat) ----------------------------------------------

@pytest.fixture(scope='module')
def support_chat():
    return read_records(ROOT/'data'/'support_chat_test.jsonl')


@pytest.mark.parametrize('train_on', ['all_assistant', 'last_assistant'])
def test_support_chat_learns_its_json_answers_and_their_end(tok, support_chat, train_on):
    for rec in support_chat[:20]:
        ex = tokenize_example(rec, tok, train_on=train_on)
        answers = [m['content'] for m in rec['messages'] if m['role'] == 'assistant']
        want = answers if train_on == 'all_assistant' else answers[-1:]
        assert [tok.decode(r) for r in runs(ex['labels'])] == [a + '<|im_end|>' for a in want]
        # evaluation reads the history, the first answer included, and generates the last answer
        last = runs(ex['labels'])[-1]
        assert prompt_ids(rec, tok, 'chat') == ex['input_ids'][:len(ex['input_ids']) - len(last)]
        assert reference_answer(rec) == answers[-1]


def test_support_chat_file_checks_clean(tok):
    rep = validate_records(ROOT/'data'/'support_chat_train.jsonl', tok)
    assert rep.ok and rep.format == 'conversations' and not rep.truncated


def test_support_chat_is_scored_field_by_field(support_chat):
    from lora_nb.infer import score_responses
    recs = list(support_chat[:2])
    m = score_responses([reference_answer(recs[0]) + '<|im_end|>', '{"intent":"x"}'], recs, task='support_chat')
    assert m == dict(n=2, json_valid=1.0, intent=0.5, order_id=0.5, urgent=0.5, exact_match=0.5)

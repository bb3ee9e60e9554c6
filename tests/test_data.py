"Dense checks of the shipped tasks (lora_nb.tasks, nbs/03_tasks.ipynb) and the data path (lora_nb.data, nbs/04_data.ipynb): shipped data, scoring, loading, validation, masking, batching."
import csv, json, re
from functools import partial
from pathlib import Path

import pytest

from lora_nb.config import data_path, load_config, project_root
from lora_nb.data import (
    Records, build_prompt, reference_answer, collate_padded, collate_padding_free, collator_for, length_grouped_batches, load_splits,
    pack_examples, padding_cost, per_example_loss, random_batches, read_records, split_records, tokenize_example,
    tokenize_records, validate_records)
from lora_nb.tasks import (
    FOLLOWUPS, INTENTS, MONTHS, SCORERS, SPLIT_SIZES, SUMMARY_CODES, SUPPORT_SYSTEM, TASKS, TEST_HELD_OUT_SHARE,
    TICKET_INSTRUCTION, WEEKDAYS, DataError, ticket_answer, first_json_object, score_summary, score_ticket, task_file_bytes, task_splits, write_task_files)

DATA = project_root()/'data'


@pytest.fixture(scope='module')
def tok():
    from lora_nb.models import load_tokenizer
    return load_tokenizer('tiny')


@pytest.fixture(scope='module')
def labelled():
    return {task: task_splits(task, with_labels=True) for task in TASKS}


def ticket_text(r):
    "The ticket of a record of any shipped task: an instruction's input, or a support chat's first user turn"
    return r['input'] if 'input' in r else r['messages'][1]['content']


def answer_labels(r):
    "The labels the record's scored answer follows (a support chat's: those after the follow-up)"
    return r['labels'].get('last', r['labels'])


FIELDS = dict(instruction=['instruction', 'input', 'output'], conversations=['messages'])


# --- shipped data -------------------------------------------------------------------------------------------

@pytest.mark.parametrize('task', list(TASKS))
def test_data_folder_regenerates_byte_identically(task):
    for name, data in task_file_bytes(task).items():
        assert (DATA/name).read_bytes() == data, f"data/{name} differs from the generator's output"


def test_write_task_files_checks_and_refuses_to_overwrite(tmp_path):
    rows = write_task_files(tmp_path, tasks=('tickets',))
    assert {r['status'] for r in rows} == {'written'}
    assert {r['status'] for r in write_task_files(tmp_path, tasks=('tickets',))} == {'unchanged'}
    p = tmp_path/'tickets_val.jsonl'
    lines = p.read_text().splitlines(keepends=True)
    p.write_text(''.join([lines[1], lines[0]] + lines[2:]))
    with pytest.raises(DataError, match=r"tickets_val.jsonl: differs from what the 'tickets' generator makes now"):
        write_task_files(tmp_path, tasks=('tickets',))
    assert 'written' in {r['status'] for r in write_task_files(tmp_path, tasks=('tickets',), overwrite=True)}
    assert p.read_bytes() == (DATA/'tickets_val.jsonl').read_bytes()


def test_split_sizes_fields_and_uniqueness(labelled):
    for task, splits in labelled.items():
        assert {k: len(v) for k, v in splits.items()} == SPLIT_SIZES
        inputs = [ticket_text(r) for v in splits.values() for r in v]
        assert len(set(inputs)) == len(inputs), f"{task}: a ticket appears twice"
    for t, s in [(t, s) for t in TASKS for s in SPLIT_SIZES]:
        for line in (DATA/f'{t}_{s}.jsonl').read_text().splitlines():
            assert list(json.loads(line)) == FIELDS[TASKS[t]['format']]


def test_held_out_phrasings_only_in_test(labelled):
    for splits in labelled.values():
        for split, recs in splits.items():
            held = [r['labels']['held_out'] for r in recs]
            assert sum(held) == (round(len(recs) * TEST_HELD_OUT_SHARE) if split == 'test' else 0)
        seen = {(r['labels']['intent'], r['labels']['phrasing']) for r in splits['train']}
        unseen = {(r['labels']['intent'], r['labels']['phrasing']) for r in splits['test']} - seen
        assert len(unseen) == 3 * len(INTENTS)


def test_intents_balanced_and_label_rates(labelled):
    for splits in labelled.values():
        for recs in splits.values():
            counts = {i: sum(r['labels']['intent'] == i for r in recs) for i in INTENTS}
            assert max(counts.values()) - min(counts.values()) <= 1
        train = splits['train']
        assert 0.35 < sum(r['labels']['urgent'] for r in train) / len(train) < 0.45
        assert 0.15 < sum(r['labels']['order_id'] is None for r in train) / len(train) < 0.4


def test_answers_follow_the_labels(labelled):
    for r in labelled['tickets']['train'][:200]:
        lab = r['labels']
        assert r['instruction'] == TICKET_INSTRUCTION
        assert r['output'] == json.dumps(dict(intent=lab['intent'], order_id=lab['order_id'], urgent=lab['urgent']), separators=(',', ':'))
        assert list(json.loads(r['output'])) == ['intent', 'order_id', 'urgent']
    for r in labelled['summary']['train'][:200]:
        lab = r['labels']
        code, order, urgency = r['output'].split(' | ')
        assert code == SUMMARY_CODES[lab['intent']]
        assert order == (f"order {lab['order_id']}" if lab['order_id'] else 'no order')
        assert urgency == ('urgent' if lab['urgent'] else 'normal')


def test_support_chat_conversations_follow_the_labels(labelled):
    keys = ('intent', 'order_id', 'urgent')
    for split, recs in labelled['support_chat'].items():
        for r in recs:
            lab, last, m = r['labels'], r['labels']['last'], r['messages']
            assert [x['role'] for x in m] == ['system', 'user', 'assistant', 'user', 'assistant']
            assert m[0]['content'] == SUPPORT_SYSTEM
            assert m[2]['content'] == ticket_answer(*(lab[k] for k in keys)) and m[4]['content'] == ticket_answer(*(last[k] for k in keys))
            changed = {k for k in keys if lab[k] != last[k]}
            kind = lab['followup']
            assert changed == {dict(order='order_id', order_fix='order_id', urgent='urgent', calm='urgent').get(kind, 'intent')}, r
            assert kind != 'order' or lab['order_id'] is None
            assert kind != 'order_fix' or lab['order_id'] is not None
            assert FIVE_DIGITS.findall(m[3]['content']) == ([last['order_id']] if kind.startswith('order') else [])
            assert not lab['followup_held_out'] or split == 'test'
    test = labelled['support_chat']['test']
    assert {r['labels']['followup'] for r in test} == set(FOLLOWUPS)
    assert 0.1 < sum(r['labels']['followup_held_out'] for r in test) / len(test) < 0.5


# A careful reader's rules: the order id is the only 5-digit number and follows an order cue; a ticket is urgent
# exactly when it contains an explicit speed word or deadline.
ORDER_CUE = re.compile(r"(?i)(?:#|order(?: no\.| number(?: is)?| ID| ref:?)?|ref:?|no\.)\s*#?(\d{5})\b")
FIVE_DIGITS = re.compile(r"(?<!\d)\d{5}(?!\d)")
URGENT_CUE = re.compile(r"(?i)\b(urgent\w*|asap|immediately|as soon as possible|right away|time sensitive|hurry|tomorrow|"
                        r"today|be quick|by (?:%s)|by (?:%s) \d+|before then)\b" % ('|'.join(WEEKDAYS), '|'.join(MONTHS)))


def test_labels_are_decidable_from_the_text(labelled):
    for task, splits in labelled.items():
        for split, recs in splits.items():
            for r in recs:
                text, lab = ticket_text(r), r['labels']
                expected = {lab['order_id']} if lab['order_id'] else set()
                assert set(ORDER_CUE.findall(text)) == expected, (task, split, text)
                assert set(FIVE_DIGITS.findall(text)) == expected, (task, split, text)
                assert bool(URGENT_CUE.search(text)) == lab['urgent'], (task, split, text)


def test_tickets_are_short(tok, labelled):
    n = sorted(len(tok(r['input'], add_special_tokens=False)['input_ids']) for r in labelled['tickets']['train'])
    assert 25 <= n[len(n) // 2] <= 50 and n[int(0.95 * len(n))] <= 70
    ans = [len(tok(r['output'], add_special_tokens=False)['input_ids']) for r in labelled['tickets']['train']]
    assert 20 <= sum(ans) / len(ans) <= 25


# --- scoring ------------------------------------------------------------------------------------------------

REF = '{"intent":"refund_request","order_id":"58392","urgent":true}'


@pytest.mark.parametrize('pred, expected', [
    (REF, dict(json_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    ('{ "order_id" : "58392", "urgent" : true, "intent" : "refund_request" }', dict(json_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    (REF + '<|im_end|>\n### Instruction:\n{"intent":"x"}', dict(json_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    ('The answer is {"intent":"refund_request","order_id":"58392","urgent":true} I hope', dict(json_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    ('{broken {"intent":"refund_request","order_id":null,"urgent":true}', dict(json_valid=1, intent=1, order_id=0, urgent=1, exact_match=0)),
    ('{"intent":"refund_request","order_id":58392,"urgent":true}', dict(json_valid=1, intent=1, order_id=0, urgent=1, exact_match=0)),
    ('{"intent":"refund_request","order_id":"58392","urgent":"true"}', dict(json_valid=1, intent=1, order_id=1, urgent=0, exact_match=0)),
    ('{"intent":"refund_request","order_id":"58392","urgent":1}', dict(json_valid=1, intent=1, order_id=1, urgent=0, exact_match=0)),
    ('{"intent":"refund_request","order_id":"58392"}', dict(json_valid=1, intent=1, order_id=1, urgent=0, exact_match=0)),
    ('{"intent":"refund_request","order_id":"58392","urgent":true,"extra":0}', dict(json_valid=1, intent=1, order_id=1, urgent=1, exact_match=0)),
    ('{"intent":"refund_request","order_id":"58392","urgent":true', dict(json_valid=0, intent=0, order_id=0, urgent=0, exact_match=0)),
    ('[1, 2]', dict(json_valid=0, intent=0, order_id=0, urgent=0, exact_match=0)),
    ('', dict(json_valid=0, intent=0, order_id=0, urgent=0, exact_match=0)),
])
def test_score_ticket(pred, expected):
    assert score_ticket(pred, REF) == expected


def test_score_ticket_null_order():
    ref = '{"intent":"account_access","order_id":null,"urgent":false}'
    assert score_ticket('{"intent":"account_access","order_id":null,"urgent":false}', ref)['exact_match'] == 1
    assert score_ticket('{"intent":"account_access","order_id":"null","urgent":false}', ref)['order_id'] == 0
    assert score_ticket('{"intent":"account_access","urgent":false}', ref)['order_id'] == 0
    with pytest.raises(DataError, match='reference is not valid JSON'): score_ticket(ref, 'ACCOUNT | no order | normal')


def test_every_shipped_answer_scores_one_against_itself_and_zero_against_other_labels(labelled):
    for task, splits in labelled.items():
        score = SCORERS[task]
        recs = splits['test']
        for a, b in zip(recs, recs[1:] + recs[:1]):
            ra, rb = reference_answer(a), reference_answer(b)
            assert score(ra, ra)['exact_match'] == 1
            same = all(answer_labels(a)[k] == answer_labels(b)[k] for k in ('intent', 'order_id', 'urgent'))
            assert score(ra, rb)['exact_match'] == int(same)


def test_first_json_object():
    assert first_json_object('x {"a": {"b": 1}} {"c": 2}') == {'a': {'b': 1}}
    assert first_json_object('no json here') is None


SREF = 'BILLING | no order | normal'


@pytest.mark.parametrize('pred, expected', [
    (SREF, dict(format_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    ('\n  BILLING|no order|normal  \nDELAY | order 12345 | urgent', dict(format_valid=1, intent=1, order_id=1, urgent=1, exact_match=1)),
    ('BILLING | order 12345 | normal', dict(format_valid=1, intent=1, order_id=0, urgent=1, exact_match=0)),
    ('BILLING | order 1234 | normal', dict(format_valid=0, intent=1, order_id=0, urgent=1, exact_match=0)),
    ('Billing | no order | normal', dict(format_valid=0, intent=0, order_id=1, urgent=1, exact_match=0)),
    ('BILLING | no order', dict(format_valid=0, intent=1, order_id=1, urgent=0, exact_match=0)),
    ('BILLING | no order | normal | extra', dict(format_valid=0, intent=1, order_id=1, urgent=1, exact_match=0)),
    ('{"intent":"billing_issue"}', dict(format_valid=0, intent=0, order_id=0, urgent=0, exact_match=0)),
])
def test_score_summary(pred, expected):
    assert score_summary(pred, SREF) == expected


def test_score_summary_bad_reference():
    with pytest.raises(DataError, match='not a summary line'): score_summary(SREF, 'billing | none | normal')


# --- loading ------------------------------------------------------------------------------------------------

RECS = [dict(instruction='Triage.', input=f'ticket {i}', output=f'answer {i}') for i in range(6)]


def test_read_all_formats(tmp_path):
    import pyarrow as pa, pyarrow.parquet as pq
    (tmp_path/'r.jsonl').write_text('\n'.join(json.dumps(r) for r in RECS) + '\n\n')
    (tmp_path/'r.json').write_text(json.dumps(RECS, indent=2))
    (tmp_path/'w.json').write_text(json.dumps({'data': RECS}))
    with open(tmp_path/'r.csv', 'w', newline='') as f:
        w = csv.DictWriter(f, list(RECS[0])); w.writeheader(); w.writerows(RECS)
    pq.write_table(pa.Table.from_pylist(RECS), tmp_path/'r.parquet')
    for name, where in [('r.jsonl', 'line 3'), ('r.json', 'item 3'), ('w.json', 'item 3'), ('r.csv', 'line 4'), ('r.parquet', 'row 3')]:
        recs = read_records(tmp_path/name)
        assert list(recs) == RECS, name
        assert recs.where[2] == where and recs.locate(2) == f"{tmp_path/name}, {where}"
    assert read_records(RECS).where[0] == 'record 1'
    import datasets
    assert list(read_records(datasets.Dataset.from_list(RECS))) == RECS


def test_byte_order_mark_is_dropped(tmp_path):
    (tmp_path/'bom.csv').write_bytes(b'\xef\xbb\xbfinstruction,input,output\r\nTriage.,hi,ok\r\n')
    (tmp_path/'bom.jsonl').write_bytes(b'\xef\xbb\xbf{"instruction": "Triage.", "input": "hi", "output": "ok"}\n')
    for name in ['bom.csv', 'bom.jsonl']:
        assert list(read_records(tmp_path/name)) == [dict(instruction='Triage.', input='hi', output='ok')]
        assert validate_records(tmp_path/name).ok


def test_read_errors(tmp_path):
    (tmp_path/'a.jsonl').write_bytes(b'{"instruction": "x", "output": "y"}\n\n{"instruction": "\xff\xfe", "output": "y"}\n')
    with pytest.raises(DataError, match=r"a.jsonl, line 3: not valid UTF-8 \(byte 0xff at column 18\)"): read_records(tmp_path/'a.jsonl')
    (tmp_path/'b.json').write_bytes(b'[\n{"instruction": "x",\n "output": "caf\xe9"}]')
    with pytest.raises(DataError, match=r"b.json, line 3: not valid UTF-8 \(byte 0xe9 at column 16\)"): read_records(tmp_path/'b.json')
    (tmp_path/'c.json').write_text('{"instruction": "x"}')
    with pytest.raises(DataError, match='expected a list of records'): read_records(tmp_path/'c.json')
    (tmp_path/'d.json').write_text('[\n{"instruction": "x",}\n]')
    with pytest.raises(DataError, match=r"d.json, line 2: not valid JSON"): read_records(tmp_path/'d.json')
    (tmp_path/'e.csv').write_text('instruction,output\na,b\nc,d,e\n')
    with pytest.raises(DataError, match=r"e.csv, line 3: more values than the header has columns"): read_records(tmp_path/'e.csv')
    (tmp_path/'f.jsonl').write_text('{"instruction": "x"}\n[1, 2\n')
    with pytest.raises(DataError, match=r"f.jsonl, line 2: not valid JSON"): read_records(tmp_path/'f.jsonl')
    with pytest.raises(DataError, match='file not found'): read_records(tmp_path/'missing.jsonl')
    (tmp_path/'g.xlsx').write_text('x')
    with pytest.raises(DataError, match=r"unsupported file type '.xlsx'"): read_records(tmp_path/'g.xlsx')


def test_hub_name_offline_says_use_a_local_file():
    with pytest.raises(DataError, match=r"could not load 'lora-nb/no-such-dataset'.*use a local file \(.jsonl, .json, .csv, .parquet\)"):
        read_records('lora-nb/no-such-dataset')


def test_split_records_is_seeded_and_disjoint():
    recs = read_records([dict(instruction='i', input=str(k), output='o') for k in range(100)])
    tr, va = split_records(recs, 0.2, seed=3)
    assert (len(tr), len(va)) == (80, 20)
    assert split_records(recs, 0.2, seed=3)[1].where == va.where != split_records(recs, 0.2, seed=4)[1].where
    assert set(tr.where).isdisjoint(va.where) and set(tr.where) | set(va.where) == set(recs.where)
    with pytest.raises(ValueError, match='val_fraction must be in'): split_records(recs, 1.0)


def test_load_splits_from_settings():
    d = load_splits(load_config(profile='').data)
    assert {k: len(v) for k, v in d.items()} == SPLIT_SIZES
    one = load_splits(load_config(profile='', overrides=['data.val_file=', 'data.test_file=']).data)
    assert (len(one['train']), len(one['val']), one['test']) == (1800, 200, None)


def test_load_splits_reads_the_same_files_from_any_folder(tmp_path, monkeypatch):
    "The one path rule (config.data_path): relative to the project root, not to the current folder"
    (tmp_path/'data').mkdir()
    (tmp_path/'data'/'tickets_train.jsonl').write_text(json.dumps(GOOD) + '\n')  # a decoy the old fallback would read
    monkeypatch.chdir(tmp_path)
    assert len(load_splits(load_config(profile='').data)['train']) == SPLIT_SIZES['train']
    absolute = load_config(profile='', overrides=[f"data.train_file={tmp_path/'data'/'tickets_train.jsonl'}"])
    assert list(load_splits(absolute.data)['train']) == [GOOD]
    assert data_path('data/x.jsonl') == project_root()/'data'/'x.jsonl'


# --- validation -----------------------------------------------------------------------------------------------

GOOD = dict(instruction='Triage.', input='my order #12345 is late', output='{"intent":"shipping_delay"}')


@pytest.mark.parametrize('bad, message', [
    (dict(instrution='Triage.', output='x'), "record 2, field 'instruction': missing (found 'instrution': misspelled?)"),
    (dict(instruction='Triage.', ouput='x'), "record 2, field 'output': missing (found 'ouput': misspelled?)"),
    (dict(instruction='Triage.', answer='x'), "record 2, field 'output': missing"),
    (dict(instruction='Triage.', input=['a'], output='x'), "record 2, field 'input': must be text, got list"),
    (dict(instruction=3, output='x'), "record 2, field 'instruction': must be text, got int 3"),
    (dict(instruction='Triage.', output='   '), "record 2, field 'output': empty"),
    (dict(instruction='', output='x'), "record 2, field 'instruction': empty"),
    (dict(instruction='Triage.', input='caf\udce9', output='x'), "record 2, field 'input': not valid UTF-8 text"),
    (dict(GOOD), "record 2: duplicate of record 1"),
    (['not', 'a', 'record'], "record 2: expected a record (object with fields), got list"),
])
def test_validation_errors_name_record_and_field(bad, message):
    with pytest.raises(DataError, match=re.escape(message)): validate_records([GOOD, bad])


def test_validation_of_a_file_names_file_and_line(tmp_path):
    p = tmp_path/'train.jsonl'
    p.write_text(json.dumps(GOOD) + '\n' + json.dumps(dict(GOOD, output='')) + '\n' + json.dumps(dict(GOOD, output=7)) + '\n')
    with pytest.raises(DataError) as e: validate_records(p)
    msg = str(e.value)
    assert msg.startswith(f"2 problem(s) in {p}:")
    assert f"{p}, line 2, field 'output': empty" in msg and f"{p}, line 3, field 'output': must be text, got int 7" in msg


def test_validation_lists_every_problem_and_more():
    recs = [GOOD] + [dict(instruction='x', output='') for _ in range(12)]
    with pytest.raises(DataError, match=r"12 problem\(s\)[\s\S]*\.\.\. and 2 more"): validate_records(recs)
    rep = validate_records(recs, raise_errors=False)
    assert not rep.ok and len(rep.errors) == 12


def test_validation_report_conflicts_ignored_fields_and_none_input():
    recs = [dict(GOOD, id=1), dict(GOOD, output='other', id=2), dict(instruction='x', input=None, output='y')]
    rep = validate_records(recs)
    assert rep.ok and rep.ignored_fields == {'id': 2}
    assert rep.conflicts == ["<list>, record 2: same instruction and input as record 1, different output"]
    assert 'ignored fields' in rep._repr_markdown_()


def test_validation_reports_truncation_and_rejects_prompts_too_long(tok):
    long_out = dict(instruction='Triage.', input='hi', output='word ' * 80)
    rep = validate_records([GOOD, long_out], tok, max_length=48)
    (t,) = rep.truncated
    assert t['where'] == '<list>, record 2' and t['tokens'] - t['over'] == 48 and t['response_tokens_lost'] == t['over']
    assert 'would be cut' in rep._repr_markdown_()
    ex = tokenize_example(long_out, tok, max_length=48)
    assert len(ex['input_ids']) == len(ex['labels']) == 48 and ex['labels'][-1] != tok.eos_token_id
    with pytest.raises(DataError, match=r"record 1, field 'input': the prompt alone is \d+ tokens, max_length is 48"):
        validate_records([dict(instruction='Triage.', input='word ' * 60, output='x')], tok, max_length=48)
    with pytest.raises(DataError, match='prompt alone'):
        tokenize_records([dict(instruction='Triage.', input='word ' * 60, output='x')], tok, max_length=48)


def test_supervised_tokens_lost_to_max_length(tok):
    "supervised_lost: what max_length cuts off of the learned tokens, a prompt that leaves nothing included"
    from lora_nb.data import ValidationReport
    long_out = dict(instruction='Triage.', input='hi', output='word ' * 80)
    too_long = dict(instruction='Triage.', input='word ' * 60, output='x y z')
    recs = [GOOD, long_out, too_long]
    rep = validate_records(recs, tok, max_length=48, raise_errors=False)
    learned = lambda L: sum(l != -100 for r in recs for l in tokenize_example(r, tok, max_length=L)['labels'])
    assert rep.supervised_lost == (learned(10**6) - learned(48), learned(10**6))
    assert rep.supervised_lost[0] > rep.truncated[0]['response_tokens_lost']  # the too-long prompt's answer counts as lost
    assert 'supervised tokens cut by max_length' in rep._repr_markdown_()
    assert ValidationReport('x', 0, 8).supervised_lost == (0, 0)


@pytest.mark.parametrize('xs, q, expected', [([5, 1, 4, 2, 3], 50, 3), ([5, 1, 4, 2, 3], 90, 5), ([5, 1, 4, 2, 3], 20, 1),
                                             ([7], 99, 7), (list(range(1, 101)), 99, 99), (list(range(1, 101)), 100, 100)])
def test_percentile_is_nearest_rank(xs, q, expected):
    from lora_nb.data import percentile
    assert percentile(xs, q) == expected


def test_shipped_data_validates(tok):
    for task in TASKS:
        for split in SPLIT_SIZES:
            rep = validate_records(DATA/f'{task}_{split}.jsonl', tok)
            assert rep.ok and not rep.truncated and not rep.conflicts and not rep.ignored_fields


# --- prompts and tokenization --------------------------------------------------------------------------------------

def test_build_prompt_forms(tok):
    assert build_prompt(GOOD) == "### Instruction:\nTriage.\n\n### Input:\nmy order #12345 is late\n\n### Response:\n"
    for inp in ('', None, '  '):
        assert build_prompt(dict(instruction='Say hi.', input=inp, output='hi')) == "### Instruction:\nSay hi.\n\n### Response:\n"
    chat = build_prompt(GOOD, 'chat', tok)
    assert chat.endswith("<|im_start|>user\nTriage.\n\nmy order #12345 is late<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(ValueError, match='needs a tokenizer'): build_prompt(GOOD, 'chat')
    with pytest.raises(ValueError, match="unknown template 'llama'"): build_prompt(GOOD, 'llama', tok)


@pytest.mark.parametrize('template', ['alpaca', 'chat'])
def test_labels_are_exactly_response_plus_eos(tok, template):
    for rec in read_records(DATA/'tickets_val.jsonl')[:50] + read_records(DATA/'summary_val.jsonl')[:50]:
        ex = tokenize_example(rec, tok, template)
        assert len(ex['input_ids']) == len(ex['labels'])
        k = sum(l == -100 for l in ex['labels'])
        assert all(l == -100 for l in ex['labels'][:k])           # the mask is one prefix: the prompt
        assert ex['labels'][k:] == ex['input_ids'][k:]
        assert tok.decode(ex['labels'][k:]) == rec['output'] + tok.eos_token
        assert ex['input_ids'][:k] == tok(build_prompt(rec, template, tok), add_special_tokens=False)['input_ids']


class _BosTokenizer:
    "A stand-in for a tokenizer that adds BOS itself (like Llama's): id = ord(char)"
    bos_token_id, eos_token_id = 1, 2
    def __call__(self, text, add_special_tokens=True):
        return dict(input_ids=([1] if add_special_tokens else []) + [ord(c) for c in text])


def test_bos_added_only_when_the_tokenizer_wants_it(tok):
    ex = tokenize_example(dict(instruction='a', output='b'), _BosTokenizer())
    assert ex['input_ids'][0] == 1 and ex['input_ids'][1] == ord('#') and ex['input_ids'][-2:] == [ord('b'), 2]
    assert tokenize_example(GOOD, tok)['input_ids'][0] != tok.bos_token_id


# --- batching ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def examples(tok):
    return [tokenize_example(r, tok) for r in read_records(DATA/'tickets_train.jsonl')[:6]]


def test_collate_padded(tok, examples):
    b = collate_padded(examples, tok.pad_token_id)
    lens = [len(e['input_ids']) for e in examples]
    assert b['input_ids'].shape == b['labels'].shape == b['attention_mask'].shape == (6, max(lens))
    for i, (e, n) in enumerate(zip(examples, lens)):
        assert b['input_ids'][i, :n].tolist() == e['input_ids'] and b['labels'][i, :n].tolist() == e['labels']
        assert b['attention_mask'][i].tolist() == [1] * n + [0] * (max(lens) - n)
        assert set(b['labels'][i, n:].tolist()) <= {-100} and set(b['input_ids'][i, n:].tolist()) <= {tok.pad_token_id}
        assert b['labels'][i, n - 1] == tok.eos_token_id              # EOS learned although pad == eos
    assert collate_padded(examples, tok.pad_token_id, pad_to_multiple_of=64)['input_ids'].shape[1] % 64 == 0
    collator = partial(collate_padded, pad_token_id=tok.pad_token_id)   # usable as a Trainer data_collator
    assert collator(examples)['input_ids'].shape == (6, max(lens))


def test_collate_padding_free(examples):
    b = collate_padding_free(examples)
    lens = [len(e['input_ids']) for e in examples]
    assert b['input_ids'].shape == b['labels'].shape == b['position_ids'].shape == (1, sum(lens))
    assert 'attention_mask' not in b
    starts = [sum(lens[:i]) for i in range(len(lens))]
    assert b['position_ids'][0].tolist() == [p for n in lens for p in range(n)]
    assert b['labels'][0, starts].tolist() == [-100] * len(lens)
    full = collate_padding_free([dict(input_ids=e['input_ids'], labels=e['input_ids']) for e in examples])
    assert full['labels'][0, starts].tolist() == [-100] * len(lens)
    assert (full['labels'] != -100).sum() == sum(lens) - len(lens)


def test_collator_for(tok, examples):
    assert collator_for('padding_free', tok) is collate_padding_free
    b = collator_for('pad', tok)(examples)
    assert b['input_ids'].shape[0] == len(examples) and b['input_ids'].shape[1] % 8 == 0
    assert b['input_ids'].shape[1] - max(len(e['input_ids']) for e in examples) < 8


@pytest.fixture(scope='module')
def tiny():
    from lora_nb.models import load_base
    model, _ = load_base('tiny')
    return model.eval()


def test_padding_free_losses_match_one_by_one(tiny, examples):
    import torch
    with torch.no_grad():
        alone = [per_example_loss(tiny(input_ids=torch.tensor([e['input_ids']])).logits, torch.tensor([e['labels']]))[0] for e in examples]
        pf = collate_padding_free(examples)
        packed = per_example_loss(tiny(**pf).logits, pf['labels'], pf['position_ids'])
        pb = collate_padded(examples, 2)
        padded = per_example_loss(tiny(**pb).logits, pb['labels'])
        cached = per_example_loss(tiny(**pf, use_cache=True).logits, pf['labels'], pf['position_ids'])
        from lora_nb.models import load_base
        sdpa = load_base('tiny', attn_implementation='sdpa')[0].eval()  # transformers' own attention
        leaky = per_example_loss(sdpa(**pf, use_cache=True).logits, pf['labels'], pf['position_ids'])
    assert max(abs(a - b) for a, b in zip(packed, alone)) < 1e-4
    assert max(abs(a - b) for a, b in zip(padded, alone)) < 1e-4
    assert max(abs(a - b) for a, b in zip(cached, alone)) < 1e-4   # packed_sdpa splits the row whatever the cache
    assert max(abs(a - b) for a, b in zip(leaky, alone)) > 1e-3    # transformers' sdpa with a KV cache: no packed mask


def test_padding_free_token_losses_match_per_position(tiny, examples):
    "Stronger than the mean: every labelled position's loss agrees, so no position sees another example"
    import torch, torch.nn.functional as F
    with torch.no_grad():
        pf = collate_padding_free(examples)
        lp = F.cross_entropy(tiny(**pf).logits[0, :-1], pf['labels'][0, 1:], reduction='none', ignore_index=-100)
        off = 0
        for e in examples:
            n = len(e['input_ids'])
            la = F.cross_entropy(tiny(input_ids=torch.tensor([e['input_ids']])).logits[0, :-1], torch.tensor(e['labels'][1:]),
                                 reduction='none', ignore_index=-100)
            assert (lp[off:off + n - 1] - la).abs().max() < 1e-4
            off += n


def test_length_grouped_batches():
    import random
    lengths = [random.Random(i).randrange(20, 200) for i in range(1000)]
    b = length_grouped_batches(lengths, 8, seed=1)
    assert sorted(i for x in b for i in x) == list(range(1000))
    assert b == length_grouped_batches(lengths, 8, seed=1) != length_grouped_batches(lengths, 8, seed=2)
    assert all(len(x) == 8 for x in b)
    cost = lambda batches: sum(len(x) * max(lengths[i] for i in x) for x in batches)
    assert cost(b) < 0.8 * cost(random_batches(1000, 8, seed=1))


def test_pack_examples():
    lengths = [100, 300, 200, 50, 500, 12]
    rows = pack_examples(lengths, 512)
    assert sorted(i for r in rows for i in r) == list(range(6))
    assert all(sum(lengths[i] for i in r) <= 512 for r in rows) and len(rows) == 3
    with pytest.raises(DataError, match='example 1 has 600 tokens > max_length=512'): pack_examples([10, 600], 512)


def test_padding_cost_table():
    lengths = [10, 20, 30, 40] * 4
    rows = {r['strategy']: r for r in padding_cost(lengths, batch_size=4, max_length=64)}
    assert rows['pad to 64']['computed_tokens'] == 16 * 64
    assert rows['padding-free'] == dict(strategy='padding-free', computed_tokens=400, padding_tokens=0, waste=0.0, cost_vs_padding_free=1.0)
    assert rows['dynamic, length-grouped']['computed_tokens'] == 400      # equal lengths group perfectly
    assert rows['packed rows of 64']['computed_tokens'] == 7 * 64

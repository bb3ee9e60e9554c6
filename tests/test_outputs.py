"""The outputs saved in the committed notebooks are fit to publish: read from nbs/*.ipynb, never run.

An output must not be an error or stderr text, must not show a path of the machine that ran it (the project root,
/home/, /root/, /work/, /tmp/), and must stay under 1 MB of JSON (a plot at sane dpi is far below; a huge table
or a runaway print is not); a widget's output needs its state saved in the notebook, or a page shows only its text.
`make notebooks` writes these outputs; this test is what keeps them reviewable.
A deliberately bad notebook proves the checker finds each problem. Every chapter carries its learner-profile run,
and that run belongs to the committed code: notebook_times.json keeps the fingerprint of the code that ran.
"""
from __future__ import annotations
import json, sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'tools'))
from run_notebooks import (CELL_TIME_MARK, RUN_TIME_MARK, code_digest, duration, notes_from_times, output_problems as nb_output_problems,
                           run_notebook, run_time_note, set_cell_times, set_run_time)

NOTEBOOKS = sorted((ROOT / 'nbs').glob('*.ipynb'))


def output_problems(nb_path) -> list[str]:
    "What is wrong with the outputs saved in notebook `nb_path` (tools/run_notebooks.py holds the rules)"
    return nb_output_problems(nbformat.read(nb_path, as_version=4), nb_path.name)


@pytest.mark.parametrize('nb_path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_committed_outputs(nb_path):
    problems = output_problems(nb_path)
    assert not problems, '\n'.join(problems)


def test_checker_finds_each_problem(tmp_path):
    outs = [new_output('error', ename='ValueError', evalue='bad', traceback=[]),
            new_output('stream', name='stderr', text='a warning\n'),
            new_output('stream', name='stdout', text=f'saved to {ROOT}/runs/x\n'),
            new_output('execute_result', data={'text/plain': "PosixPath('/home/me/x')"}, execution_count=1),
            new_output('display_data', data={'text/html': '<pre>/tmp/tmpab12/run</pre>'}),
            new_output('display_data', data={'image/png': 'A' * 1_100_000, 'text/plain': '<Figure>'}),
            new_output('display_data', data={'application/vnd.jupyter.widget-view+json': dict(model_id='m1', version_major=2),
                                             'text/plain': 'generating: 0%'})]
    bad = tmp_path / 'bad.ipynb'
    nbformat.write(new_notebook(cells=[new_code_cell('x', outputs=outs)]), bad)
    problems = output_problems(bad)
    for expected in ['error output ValueError: bad', 'stderr output', f"machine path '{ROOT}'", "'/home/'", "'/tmp/'",
                     'output of 1.1 MB', 'widget m1 has no saved state']:
        assert any(expected in p for p in problems), f"{expected!r} not found in {problems}"
    good = tmp_path / 'good.ipynb'
    nbformat.write(new_notebook(cells=[new_code_cell('x', outputs=[new_output('stream', name='stdout', text='ok\n')])]), good)
    assert output_problems(good) == []


CHAPTERS = [p for p in NOTEBOOKS if p.stem[:2].isdigit()]
TIMES = json.loads((ROOT / 'nbs' / 'notebook_times.json').read_text())
LEARNER_RUN = [p for p in CHAPTERS if TIMES.get(p.stem, {}).get('profile') == 'learner']


def test_every_chapter_carries_a_learner_run():
    "`make notebooks` saved every chapter in the learner profile (a new chapter needs its run before it lands)"
    assert [p.stem for p in LEARNER_RUN] == [p.stem for p in CHAPTERS]


@pytest.mark.parametrize('nb_path', LEARNER_RUN, ids=[p.stem for p in LEARNER_RUN])
def test_chapter_carries_its_learner_run(nb_path):
    "Each chapter was saved by `make notebooks` in the learner profile: outputs, its Run All time, notes on long cells"
    nb = nbformat.read(nb_path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == 'code']
    assert any(c.outputs for c in code), f"{nb_path.name}: no code cell carries an output"
    note = next((c.source for c in nb.cells[:3] if c.cell_type == 'markdown' and c.source.startswith(RUN_TIME_MARK)), '')
    assert 'learner profile' in note, f"{nb_path.name}: no learner-profile Run All time after the title"
    record = TIMES[nb_path.stem]
    assert record.get('code') == code_digest(nb), \
        f"{nb_path.name}: its code changed after its saved run: `tools/run_notebooks.py --only {nb_path.stem}` again"
    assert f"Run All: {duration(record['seconds'])} in the learner profile" in note and record['date'][:10] in note, (note, record)
    ids = [c.get('id') for c in nb.cells]
    for lc in record['long_cells']:
        i = ids.index(lc['id'])
        assert nb.cells[i - 1].source.startswith(CELL_TIME_MARK), f"{nb_path.name}: no time note above {lc['code']!r}"


def test_code_digest_follows_code_not_outputs_or_prose():
    nb = new_notebook(cells=[new_markdown_cell('# T'), new_code_cell('x = 1', outputs=[new_output('stream', name='stdout', text='1')])])
    before = code_digest(nb)
    nb.cells[0].source, nb.cells[1].outputs = '# Title, reworded', []
    assert code_digest(nb) == before
    nb.cells[1].source = 'x = 2'
    assert code_digest(nb) != before


def test_notes_are_rewritten_not_added(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell('# Title'), new_code_cell('x = 1', id='a'), new_code_cell('y = 2', id='b')])
    for seconds in (70, 200):
        set_run_time(nb, run_time_note(seconds, 'learner'))
        set_cell_times(nb, [dict(id='b', code='y = 2', seconds=seconds)], 'learner')
    kinds = [c.source.split('\n')[0] if c.cell_type == 'markdown' else c.id for c in nb.cells]
    assert kinds == ['# Title', RUN_TIME_MARK, 'a', CELL_TIME_MARK, 'b'], kinds
    assert 'Run All: 3 minutes in the learner profile' in nb.cells[1].source and 'about 3 minutes' in nb.cells[3].source
    set_cell_times(nb, [], 'learner')
    assert [c.get('id') for c in nb.cells if c.cell_type == 'code'] == ['a', 'b'] and len(nb.cells) == 4
    path = tmp_path / 'nb.ipynb'
    nbformat.write(nb, path)
    notes_from_times(path, dict(profile='learner', seconds=95, date='2026-12-01T10:00:00',
                                long_cells=[dict(code='x = 1', seconds=90)]))  # matched by its code
    again = nbformat.read(path, as_version=4)
    assert again.cells[2].source.startswith(CELL_TIME_MARK) and 'about 90 seconds' in again.cells[2].source
    assert 'Run All: 3 minutes' in again.cells[1].source  # nb.ipynb is not a chapter (NN_name): its Run All note is left alone
    chapter = tmp_path / '07_x.ipynb'
    nbformat.write(again, chapter)
    notes_from_times(chapter, dict(profile='learner', seconds=95, date='2026-12-01T10:00:00', long_cells=[]))
    assert 'Run All: 95 seconds in the learner profile' in nbformat.read(chapter, as_version=4).cells[1].source
    assert 'on 2026-12-01' in nbformat.read(chapter, as_version=4).cells[1].source


def test_run_notebook_saves_outputs_cleaned(tmp_path):
    "A two-cell chapter run in a real kernel: outputs saved, volatile metadata gone, its time noted, a slow cell skipped"
    src = tmp_path / '99_demo.ipynb'
    nbformat.write(new_notebook(cells=[new_markdown_cell('# Demo'), new_code_cell('print(6 * 7)', id='p'),
                                       new_code_cell('#| slow\nraise SystemExit', id='s')]), src)
    seconds, long_cells = run_notebook(src, tmp_path / 'out.ipynb', {'slow'}, timeout=120, profile='fast')
    out = nbformat.read(tmp_path / 'out.ipynb', as_version=4)
    printed = next(c for c in out.cells if c.get('id') == 'p')
    assert printed.outputs[0].text == '42\n' and printed.execution_count is None and long_cells == []
    assert out.cells[1].source.startswith(RUN_TIME_MARK) and 'the fast profile' in out.cells[1].source
    assert not next(c for c in out.cells if c.get('id') == 's').outputs

"""The outputs saved in the committed notebooks are fit to publish: read from nbs/*.ipynb, never run.

An output must not be an error or stderr text, must not show a path of the machine that ran it (the project root,
/home/, /root/, /work/, /tmp/), and must stay under 1 MB of JSON (a plot at sane dpi is far below; a huge table
or a runaway print is not). `make notebooks` writes these outputs; this test is what keeps them reviewable.
A deliberately bad notebook proves the checker finds each problem.
"""
from __future__ import annotations
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_notebook, new_output
import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / 'tools'))
from run_notebooks import output_problems as nb_output_problems

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
            new_output('display_data', data={'image/png': 'A' * 1_100_000, 'text/plain': '<Figure>'})]
    bad = tmp_path / 'bad.ipynb'
    nbformat.write(new_notebook(cells=[new_code_cell('x', outputs=outs)]), bad)
    problems = output_problems(bad)
    for expected in ['error output ValueError: bad', 'stderr output', f"machine path '{ROOT}'", "'/home/'", "'/tmp/'",
                     'output of 1.1 MB']:
        assert any(expected in p for p in problems), f"{expected!r} not found in {problems}"
    good = tmp_path / 'good.ipynb'
    nbformat.write(new_notebook(cells=[new_code_cell('x', outputs=[new_output('stream', name='stdout', text='ok\n')])]), good)
    assert output_problems(good) == []

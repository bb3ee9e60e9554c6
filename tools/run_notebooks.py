"""Run every chapter top to bottom in a real Jupyter kernel and save its outputs into the notebook.

This is how the committed notebooks get their outputs: each chapter runs in a fresh `python3` kernel of this venv,
in `nbs/` (as JupyterLab runs it), with the learner profile (the real model: LORA_NB_PROFILE unset) unless
`--profile fast` asks for the tiny test model. In the fast profile the cells `nbdev-test` skips (`#| slow`,
`#| notest`: pyproject's tst_flags) are not run, as `make test` does not run them. The executed notebook is
cleaned the way `nbdev-clean` cleans (outputs kept; execution counts, timestamps and other volatile metadata
dropped) and written atomically. A chapter that raises is not saved: its failing cell is reported, the other
chapters still run, and the exit status is 1. Each chapter's wall time goes to `notebook_times.json` beside the
notebooks written, with the fingerprint of the code that ran (`code_digest`: a test tells outputs gone stale when a
code cell changes afterwards); the chapter opens with its Run All time and a cell that ran longer than a minute
gets a note above it with its time. Outputs unfit to publish (`output_problems`: what tests/test_outputs.py rejects) are listed as
soon as their chapter is saved. `--notes-only` rewrites those notes from notebook_times.json without running.

    .venv/bin/python tools/run_notebooks.py                                  # every chapter, in place
    .venv/bin/python tools/run_notebooks.py --profile fast --only 00_lora_math --output-dir /tmp/nbrun
"""
from __future__ import annotations
import argparse, datetime, hashlib, json, os, re, sys, time, tomllib
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbdev.clean import clean_nb
from nbdev.config import get_config

from lora_nb.core import atomic_write_text, cpu_name  # the package's own: no torch at import

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'


def cell_flags(source: str) -> set:
    "Names of the `#| ...` directives that open a code cell ({'slow', 'export', ...})"
    flags = set()
    for line in source.splitlines():
        if not line.startswith('#|'): break
        if (m := re.match(r'#\|\s*([\w-]+)', line)): flags.add(m[1])
    return flags


def test_flags() -> set:
    "The flags of cells plain `nbdev-test` skips (pyproject.toml [tool.nbdev] tst_flags)"
    cfg = tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['nbdev']
    return set(cfg.get('tst_flags', '').split())


def clean(nb):
    "What `nbdev-clean` (clear_all=False) does to a notebook, with this project's settings: outputs stay"
    cfg = get_config(path=ROOT)
    clean_nb(nb, clear_all=False, allowed_metadata_keys=cfg.get('allowed_metadata_keys') or [],
             allowed_cell_metadata_keys=cfg.get('allowed_cell_metadata_keys') or [], clean_ids=cfg.clean_ids,
             allowed_out_metadata_keys=cfg.get('allowed_out_metadata_keys') or [])


MACHINE_PATHS = sorted({str(ROOT), '/home/', '/root/', '/work/', '/tmp/'})
TEXT_TYPES = ('text/plain', 'text/html', 'text/markdown')
MAX_OUTPUT_BYTES = 1_000_000


def output_texts(out) -> list[str]:
    "The text an output shows: stream text and its text/plain, text/html, text/markdown representations"
    texts = [out.get('text', '')] + [out.get('data', {}).get(k, '') for k in TEXT_TYPES]
    return [t if isinstance(t, str) else ''.join(t) for t in texts if t]


def output_problems(nb, name: str) -> list[str]:
    "What makes the outputs saved in notebook `nb` unfit to publish, one line per problem (empty: nothing)"
    problems = []
    widgets = nb.metadata.get('widgets', {}).get('application/vnd.jupyter.widget-state+json', {}).get('state', {})
    for i, cell in enumerate(nb.cells):
        for out in cell.get('outputs', []):
            where = f"{name} cell {i}"
            view = out.get('data', {}).get('application/vnd.jupyter.widget-view+json')
            if view and view.get('model_id') not in widgets:
                problems.append(f"{where}: widget {view.get('model_id')} has no saved state (a page shows its text only)")
            if out.output_type == 'error': problems.append(f"{where}: error output {out.ename}: {out.evalue}")
            if out.output_type == 'stream' and out.name == 'stderr':
                problems.append(f"{where}: stderr output {out.text[:80]!r}")
            for text in output_texts(out):
                for p in MACHINE_PATHS:
                    if p in text: problems.append(f"{where}: output shows the machine path {p!r}")
            size = len(json.dumps(out))
            if size > MAX_OUTPUT_BYTES: problems.append(f"{where}: output of {size / 1e6:.1f} MB (limit {MAX_OUTPUT_BYTES / 1e6:.0f} MB)")
    return problems


def first_line(source: str) -> str:
    return next((l for l in source.splitlines() if l.strip() and not l.startswith('#|')), '').strip()


RUN_TIME_MARK = '<!-- run-all-time: written by tools/run_notebooks.py -->'
LONG_CELL = 60  # seconds: a cell that runs longer is listed in notebook_times.json


def duration(seconds: float) -> str:
    "'1 second', '95 seconds', '26 minutes'"
    if seconds >= 120: return f"{seconds / 60:.0f} minutes"
    return f"{max(round(seconds), 1)} second{'s' if max(round(seconds), 1) != 1 else ''}"


def run_time_note(seconds: float, profile: str, day: str | None = None) -> str:
    "The line a chapter opens with: how long its Run All took, where and when (`day`: YYYY-MM-DD, default today)"
    what = 'the learner profile (the real SmolLM2)' if profile == 'learner' else f'the {profile} profile'
    return (f"{RUN_TIME_MARK}\n*Run All: {duration(seconds)} in {what} on a {os.cpu_count()}-core {cpu_name()}, "
            f"measured by `make notebooks` on {day or f'{datetime.date.today():%Y-%m-%d}'}.*")


def set_run_time(nb, note: str):
    "Replace the chapter's run-time cell, or insert one after its title cell"
    cell = next((c for c in nb.cells if c.cell_type == 'markdown' and c.source.startswith(RUN_TIME_MARK)), None)
    if cell is not None: cell.source, cell.id = note, 'run-all-time'
    else: nb.cells.insert(1, nbformat.v4.new_markdown_cell(note, id='run-all-time'))  # a fixed id: no churn in diffs


CELL_TIME_MARK = '<!-- cell-time: written by tools/run_notebooks.py -->'


def cell_time_note(seconds: float, profile: str) -> str:
    "The line above a long cell: how long it took in the run that saved its outputs"
    return (f"{CELL_TIME_MARK}\n*The next cell takes about {duration(seconds)} in the {profile} profile on a "
            f"{os.cpu_count()}-core {cpu_name()} (measured by `make notebooks`).*")


def code_digest(nb) -> str:
    "Fingerprint of a notebook's code (its code cells' sources, in order): a saved run belongs to this code only"
    h = hashlib.sha256()
    for c in nb.cells:
        if c.cell_type == 'code': h.update(c.source.encode() + b'\0')
    return h.hexdigest()[:16]


def set_cell_times(nb, long_cells: list, profile: str):
    "Drop the old notes above long cells; put one above each cell of `long_cells` (dicts with its `id` and `seconds`)"
    nb.cells = [c for c in nb.cells if not (c.cell_type == 'markdown' and c.source.startswith(CELL_TIME_MARK))]
    took = {lc['id']: lc['seconds'] for lc in long_cells}
    for i in reversed(range(len(nb.cells))):
        if (cid := nb.cells[i].get('id')) in took:
            nb.cells.insert(i, nbformat.v4.new_markdown_cell(cell_time_note(took[cid], profile), id=f'{cid}-time'[-64:]))


def run_notebook(src: Path, dest: Path, skip_flags: set, timeout: int, profile: str = 'learner') -> tuple[float, list]:
    "Execute `src` cell by cell in a fresh kernel (cwd: its folder); save it, cleaned, to `dest`; (seconds, long cells)"
    nb = nbformat.read(src, as_version=4)
    client = NotebookClient(nb, timeout=timeout, kernel_name='python3', record_timing=False,
                            resources={'metadata': {'path': str(src.parent)}})
    t0, long_cells = time.time(), []
    client.reset_execution_trackers()
    with client.setup_kernel():  # what client.execute() does, with cells skipped by flag
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            if cell_flags(cell.source) & skip_flags: cell.outputs, cell.execution_count = [], None; continue
            c0 = time.time()
            try: client.execute_cell(cell, i, execution_count=client.code_cells_executed + 1)
            except CellExecutionError as e:
                raise RuntimeError(f"cell {i} ({first_line(cell.source)[:60]!r}) raised "
                                   f"{e.ename}: {e.evalue}") from e
            if time.time() - c0 > LONG_CELL:
                long_cells.append(dict(id=cell.get('id'), code=first_line(cell.source)[:80], seconds=round(time.time() - c0)))
        client.set_widgets_metadata()  # widget state, so a saved slider still shows in a static page
    seconds = time.time() - t0
    if src.stem[:2].isdigit(): set_run_time(nb, run_time_note(seconds, profile))  # chapters open with it; not the index
    set_cell_times(nb, long_cells, profile)
    clean(nb)
    atomic_write_text(dest, nbformat.writes(nb) + '\n')
    for problem in output_problems(nb, dest.name): print(f'  unfit to publish: {problem}', flush=True)
    return seconds, long_cells


def notes_from_times(nb_path: Path, record: dict) -> list:
    "Rewrite a saved notebook's Run All and long-cell notes from its `notebook_times.json` record (no kernel, outputs untouched)"
    nb = nbformat.read(nb_path, as_version=4)
    code = {first_line(c.source)[:80]: c.get('id') for c in nb.cells if c.cell_type == 'code'}
    long_cells = [dict(lc, id=lc.get('id') or code.get(lc['code'])) for lc in record.get('long_cells', [])]
    set_cell_times(nb, long_cells, record.get('profile', 'learner'))
    if nb_path.stem[:2].isdigit():
        set_run_time(nb, run_time_note(record['seconds'], record.get('profile', 'learner'), record.get('date', '')[:10] or None))
    atomic_write_text(nb_path, nbformat.writes(nb) + '\n')
    return long_cells


def chapters(nbs_dir: Path, only: list | None, index: bool) -> list[Path]:
    "The notebooks to run: every `NN_*.ipynb` (plus index.ipynb with `index`), or those named in `only`"
    every = sorted(nbs_dir.glob('[0-9][0-9]_*.ipynb')) + ([nbs_dir / 'index.ipynb'] if index or only else [])
    if not only: return every
    by_name = {p.stem: p for p in every}
    unknown = [n for n in only if Path(n).stem not in by_name]
    if unknown: sys.exit(f"no such notebook in {nbs_dir}: {', '.join(unknown)}")
    return [by_name[Path(n).stem] for n in only]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--only', nargs='+', metavar='NAME', help='run only these notebooks (00_lora_math, 07_monitors, ...)')
    ap.add_argument('--index', action='store_true', help='run index.ipynb too')
    ap.add_argument('--profile', default='', help="LORA_NB_PROFILE for the kernels ('fast': tiny model); default: "
                                                  "unset, the learner profile with the real model")
    ap.add_argument('--output-dir', type=Path, help='write the executed notebooks here instead of over nbs/')
    ap.add_argument('--timeout', type=int, default=3600, help='seconds a cell may run')
    ap.add_argument('--nbs', type=Path, default=NBS, help='folder of the notebooks')
    ap.add_argument('--notes-only', action='store_true', help='only rewrite the long-cell notes from notebook_times.json')
    args = ap.parse_args(argv)
    if args.notes_only:
        times_path = args.nbs / 'notebook_times.json'
        times = json.loads(times_path.read_text())
        for src in chapters(args.nbs, args.only, args.index):
            if src.stem in times: times[src.stem]['long_cells'] = notes_from_times(src, times[src.stem])
        atomic_write_text(times_path, json.dumps(times, indent=1) + '\n')
        return

    os.environ.pop('LORA_NB_PROFILE', None)
    if args.profile: os.environ['LORA_NB_PROFILE'] = args.profile
    os.environ.pop('MPLBACKEND', None)  # kernels draw with the inline backend, so plots are saved as images
    out_dir = (args.output_dir or args.nbs).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    skip = test_flags() if args.profile == 'fast' else set()
    times_path = out_dir / 'notebook_times.json'
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    failed = []
    for src in chapters(args.nbs, args.only, args.index):
        try: seconds, long_cells = run_notebook(src, out_dir / src.name, skip, args.timeout, args.profile or 'learner')
        except Exception as e:
            print(f'{src.stem:20} FAILED: {e}', flush=True)
            failed.append(src.stem)
            continue
        print(f'{src.stem:20} {seconds:8.1f} s', flush=True)
        times[src.stem] = dict(seconds=round(seconds, 1), date=datetime.datetime.now().isoformat(timespec='seconds'),
                               cpu=cpu_name(), cpus=os.cpu_count(), profile=args.profile or 'learner', long_cells=long_cells,
                               code=code_digest(nbformat.read(out_dir / src.name, as_version=4)))
        atomic_write_text(times_path, json.dumps(dict(sorted(times.items())), indent=1) + '\n')
    if failed: sys.exit(f"{len(failed)} notebook(s) failed: {', '.join(failed)} (not saved)")


if __name__ == '__main__': main()

"""Every chapter, run top to bottom in JupyterLab in a real (headless) Chromium, the way a learner runs it.

One JupyterLab server (the venv's own, so kernels `import lora_nb`) serves a temporary copy of nbs/; each notebook
is opened in its own workspace, run with Run All from the menu, saved, and checked:
every code cell ran, no error and no stderr output, every plot is an image on the page, every widget is live,
and moving one slider changes what the chapter shows, in agreement with the plain function the widget wraps.
A screenshot of each notebook goes to tests/artifacts/. Kernels get LORA_NB_PROFILE (default: fast); in the fast
profile the cells `nbdev-test` skips (`#| slow`: real model) are left out of the copy, as nbdev-test leaves them out;
`LORA_NB_PROFILE= pytest tests/test_browser.py` runs every cell with the real model (minutes).
Needs chromium (`apt-get install -y chromium`) and playwright (`pip install playwright`; never `playwright install`).
"""
from __future__ import annotations
import json, os, re, shutil, time, urllib.request
from pathlib import Path

import nbformat
import pytest

from conftest import (ROOT, free_port, get_json, record_timing, require, start_server, stop_process, venv_tool,
                      wait_for_http)

# LORA_NB_BROWSER_ONLY: a regular expression that picks chapters by file name (`make test` runs the ones with widgets
# and a live training plot; `make test-browser` and `make test-learner` run them all)
NOTEBOOKS = sorted(p.name for p in (ROOT / 'nbs').glob('*.ipynb')
                   if p.name != 'index.ipynb' and not p.name.startswith('_')
                   and re.search(os.environ.get('LORA_NB_BROWSER_ONLY', ''), p.name))
TOKEN = 'lora-nb-browser-test'
TIMEOUT = float(os.environ.get('LORA_NB_BROWSER_TIMEOUT', 240))  # seconds per notebook (2 busy cores)
# stderr text a notebook may print (regexes). Keep it empty: library noise is fixed in the notebook, not here.
STDERR_ALLOWED: list[str] = []
WIDGET_MIME = 'application/vnd.jupyter.widget-view+json'
# what a widget looks like when the browser could not render it: its Python repr as text
WIDGET_REPR = re.compile(r'^\s*(interactive|[A-Z]\w*(Slider|Box|Dropdown|Checkbox|Button|Text|Select\w*|Tab|Accordion)'
                         r'|VBox|HBox|Output|Label|HTML|Play)\((children|value|options|description|layout|outputs)=')
ANSI = re.compile(r'\x1b\[[0-9;]*[A-Za-z]')
CHROMIUM_ARGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
                 '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage']


def find_chromium() -> str | None:
    "Path of a Chromium binary: $CHROMIUM, or chromium / chromium-browser on PATH"
    if os.environ.get('CHROMIUM'): return shutil.which(os.environ['CHROMIUM'])
    return shutil.which('chromium') or shutil.which('chromium-browser')


# ---------------------------------------------------------------------------------------------------------------
# fixtures: the JupyterLab server and the browser

def write_lab_settings(settings_dir: Path):
    "No news toast or update check; every cell kept in the page (windowing off), so the DOM holds all outputs"
    settings = {'@jupyterlab/apputils-extension/notification.jupyterlab-settings': {'fetchNews': 'false',
                                                                                    'checkForUpdates': False},
                '@jupyterlab/notebook-extension/tracker.jupyterlab-settings': {'windowingMode': 'none'}}
    for rel, d in settings.items():
        p = settings_dir / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(d))


def nbdev_skip_flags() -> set:
    "Cell flags plain `nbdev-test` skips (pyproject [tool.nbdev] tst_flags, e.g. slow = real-model cells)"
    import tomllib
    return set(tomllib.loads((ROOT / 'pyproject.toml').read_text())['tool']['nbdev'].get('tst_flags', '').split())


def cell_flags(cell) -> set:
    "Directives of a code cell's leading `#| ...` lines ({'slow', 'export', ...})"
    out = set()
    for line in cell.source.splitlines():
        if not line.startswith('#|'): break
        out.update(re.findall(r'[\w-]+', line[2:])[:1])
    return out


def copy_notebooks(dest: Path, drop_flags: set) -> dict:
    "Copy nbs/ to `dest`, leaving out code cells flagged with `drop_flags` (as nbdev-test does); {notebook: n dropped}"
    shutil.copytree(ROOT / 'nbs', dest, ignore=shutil.ignore_patterns('.ipynb_checkpoints'))
    dropped = {}
    for path in dest.glob('*.ipynb'):
        nb = nbformat.read(path, as_version=4)
        keep = [c for c in nb.cells if c.cell_type != 'code' or not cell_flags(c) & drop_flags]
        if len(keep) < len(nb.cells):
            dropped[path.name], nb.cells = len(nb.cells) - len(keep), keep
            nbformat.write(nb, path)
    return dropped


@pytest.fixture(scope='session')
def lab(tmp_path_factory):
    "A JupyterLab server on 127.0.0.1 serving a copy of nbs/; yields a dict with url, token, root, runtime dir"
    jupyter = venv_tool('jupyter')
    require(jupyter and (jupyter.parent / 'jupyter-lab').exists(), 'jupyterlab is not installed in the venv')
    tmp = tmp_path_factory.mktemp('lab')
    root, profile = tmp / 'nbs', os.environ.get('LORA_NB_PROFILE', 'fast')
    # the fast profile runs what `nbdev-test` runs (real-model `#| slow` cells left out); any other profile runs all
    dropped = copy_notebooks(root, nbdev_skip_flags() if profile == 'fast' else set())
    dirs = {k: tmp / k for k in ('config', 'runtime', 'ipython', 'mpl', 'settings', 'workspaces')}
    for d in dirs.values(): d.mkdir()
    write_lab_settings(dirs['settings'])
    env = {k: v for k, v in os.environ.items() if k != 'MPLBACKEND'}  # kernels use the inline backend
    env.update(JUPYTER_CONFIG_DIR=str(dirs['config']), JUPYTER_RUNTIME_DIR=str(dirs['runtime']),
               IPYTHONDIR=str(dirs['ipython']), MPLCONFIGDIR=str(dirs['mpl']),
               JUPYTERLAB_SETTINGS_DIR=str(dirs['settings']), JUPYTERLAB_WORKSPACES_DIR=str(dirs['workspaces']),
               LORA_NB_SETTINGS=str(ROOT / 'settings.ini'),  # data paths resolve against the real checkout
               LORA_NB_PROFILE=profile)
    port = free_port()
    cmd = [str(jupyter), 'lab', '--no-browser', '--ip=127.0.0.1', f'--port={port}', '--port-retries=0',
           f'--ServerApp.root_dir={root}', f'--IdentityProvider.token={TOKEN}']
    if os.geteuid() == 0: cmd.append('--allow-root')
    log = tmp / 'jupyter.log'
    proc = start_server(cmd, env, log, cwd=root)
    url = f'http://127.0.0.1:{port}'
    try:
        record_timing('lab', 'server start', wait_for_http(f'{url}/api/status?token={TOKEN}', proc, log))
        yield dict(url=url, token=TOKEN, root=root, runtime=dirs['runtime'], log=log, dropped=dropped)
    finally:
        stop_process(proc)


@pytest.fixture(scope='session')
def browser():
    "A browser context of headless Chromium, driven by playwright"
    exe = find_chromium()
    require(exe, 'chromium not found: apt-get update && apt-get install -y chromium (never `playwright install`)')
    try: from playwright.sync_api import sync_playwright
    except ImportError: require(False, 'playwright is not installed: .venv/bin/pip install playwright')
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        context = b.new_context(viewport={'width': 1400, 'height': 1000})  # one context: JupyterLab's assets cached
        yield context
        context.close()
        b.close()


# ---------------------------------------------------------------------------------------------------------------
# driving JupyterLab

KERNEL_STATUS = '#jp-main-statusbar .jp-StatusBar-TextItem[title^="Change kernel"]'
PROMPTS = '.jp-Notebook .jp-CodeCell .jp-InputArea-prompt'


def dialog_text(page) -> str | None:
    "Text of an open JupyterLab dialog (kernel died, select kernel, ...), if any"
    d = page.locator('.jp-Dialog')
    return ' '.join(d.first.inner_text().split()) if d.count() else None


def wait_until(page, cond, timeout: float, what: str, poll: float = 0.5):
    "Poll `cond()` until truthy; fail on timeout or when a dialog opens"
    t0 = time.time()
    while time.time() - t0 < timeout:
        v = cond()
        if v: return v
        if (d := dialog_text(page)): pytest.fail(f"{what}: a dialog opened: {d}")
        page.wait_for_timeout(poll * 1000)
    pytest.fail(f"{what}: not done after {timeout:.0f} s")


def kernel_idle(page) -> bool:
    loc = page.locator(KERNEL_STATUS)
    return loc.count() > 0 and loc.first.inner_text().strip().endswith('| Idle')


def run_all(page, deadline: float):
    "Run All from the Run menu; return when no prompt shows [*] and the kernel is idle (checked twice)"
    page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^Run$')).click()
    page.locator('li.lm-Menu-item[data-command="runmenu:run-all"]').click()
    wait_until(page, lambda: any(t.strip() != '[ ]:' for t in page.locator(PROMPTS).all_inner_texts()), 30,
               'Run All did not start a single cell')
    stable = 0
    while stable < 2:
        if time.time() > deadline:
            running = [i for i, t in enumerate(page.locator(PROMPTS).all_inner_texts()) if '*' in t]
            pytest.fail(f"Run All not finished within {TIMEOUT:.0f} s (code cells still running: {running})")
        if (d := dialog_text(page)): pytest.fail(f"a dialog opened during Run All: {d}")
        busy = any('*' in t for t in page.locator(PROMPTS).all_inner_texts())
        stable = stable + 1 if (not busy and kernel_idle(page)) else 0
        page.wait_for_timeout(500)


def save(page, path: Path):
    "Ctrl+S (the File menu's Save if the key press found no focus); wait until the file on disk is newer, tab clean"
    before = path.stat().st_mtime_ns
    saved = lambda: path.stat().st_mtime_ns != before and not page.locator('.lm-TabBar-tab.jp-mod-dirty').count()
    page.keyboard.press('Escape')
    page.keyboard.press('Control+s')
    t0 = time.time()
    while time.time() - t0 < 10 and not saved(): page.wait_for_timeout(250)
    if not saved():
        page.locator('.lm-MenuBar-itemLabel', has_text=re.compile(r'^File$')).click()
        page.locator('li.lm-Menu-item[data-command="docmanager:save"]').click()
    wait_until(page, saved, 30, 'saving the notebook')


def session_for(lab, name: str) -> dict:
    "The Jupyter session (kernel) of notebook `name`"
    sessions = get_json(f"{lab['url']}/api/sessions?token={lab['token']}")
    return next(s for s in sessions if s['path'] == name)


def shutdown_kernels(lab, name: str):
    "Stop the kernels of notebook `name` (each holds models; the next notebook needs the cores and memory)"
    for s in get_json(f"{lab['url']}/api/sessions?token={lab['token']}"):
        if s['path'] != name: continue
        req = urllib.request.Request(f"{lab['url']}/api/sessions/{s['id']}", method='DELETE',
                                     headers={'Authorization': f"token {lab['token']}"})
        urllib.request.urlopen(req, timeout=30).close()


# ---------------------------------------------------------------------------------------------------------------
# checks on the saved notebook and the page

def first_line(cell) -> str:
    return next((l for l in cell.source.splitlines() if l.strip() and not l.startswith('#|')), '')[:80]


def saved_problems(nb) -> list[str]:
    "Cells that did not run, errors, stderr text (not in STDERR_ALLOWED), as readable lines"
    out = []
    for i, c in enumerate(nb.cells):
        if c.cell_type != 'code' or not c.source.strip(): continue
        where = f"cell {c.get('id', i)} ({first_line(c)!r})"  # ids survive the copy; indexes shift when cells are left out
        if c.execution_count is None: out.append(f"{where}: did not run")
        for o in c.outputs:
            if o.output_type == 'error':
                tb = ANSI.sub('', '\n'.join(o.traceback))[-1500:]
                out.append(f"{where}: {o.ename}: {ANSI.sub('', o.evalue)}\n{tb}")
            elif o.output_type == 'stream' and o.name == 'stderr':
                if not any(re.search(p, o.text) for p in STDERR_ALLOWED):
                    out.append(f"{where}: stderr: {o.text.strip()[:2000]}")
    return out


def count_saved(nb, mime: str) -> int:
    return sum(mime in o.get('data', {}) for c in nb.cells if c.cell_type == 'code' for o in c.outputs)


PAGE_OUTPUTS_JS = """() => {
  const outs = [...document.querySelectorAll('.jp-Notebook .jp-OutputArea-output')];
  const top = outs.filter(o => !o.closest('.jupyter-widgets'));  // outputs of cells, not of widgets
  const live = top.filter(o => o.querySelector(':scope > .jupyter-widgets'));
  const plain = top.filter(o => !live.includes(o));
  const imgs = plain.flatMap(o => [...o.querySelectorAll('img[src^="data:image/png"]')]);
  return {
    images: imgs.length,
    broken_images: imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length,
    live_widgets: live.length,
    texts: plain.map(o => o.innerText.slice(0, 200)),
  };
}"""

# what the chapter shows: widget output areas, plots, plain outputs (slider readouts excluded: they always move)
SHOWN_JS = """() => {
  const nb = document.querySelector('.jp-Notebook');
  const parts = [...nb.querySelectorAll('.widget-output')].map(e => e.innerText);
  parts.push(...[...nb.querySelectorAll('img')].map(i => i.src.length + ':' + i.src.slice(-64)));
  parts.push(...[...nb.querySelectorAll('.jp-OutputArea-output')]
                 .filter(o => !o.closest('.jupyter-widgets') && !o.querySelector(':scope > .jupyter-widgets'))
                 .map(o => o.innerText));
  return parts.join('\\n');
}"""

# before the screenshot: bring the first widget, else the last plot, else the end of the notebook into view
SCROLL_TO_SHOW_JS = """() => {
  const nb = document.querySelector('.jp-Notebook');
  if (!nb) return;
  const imgs = nb.querySelectorAll('.jp-OutputArea-output img');
  const t = nb.querySelector('.jp-OutputArea-output .jupyter-widgets') || imgs[imgs.length - 1]
            || [...nb.querySelectorAll('.jp-Cell')].pop();
  if (t) t.scrollIntoView({block: 'center'});
}"""

RENDER_HTML_JS = """html => {
  const d = document.createElement('div'); d.className = 'jp-RenderedHTMLCommon';
  d.innerHTML = html; document.body.appendChild(d);
  const t = d.innerText; d.remove(); return t;
}"""

# run in the notebook's kernel: every ipywidgets.interactive with a control labelled `label`, called afresh
PROBE_CODE = r'''
def _lora_nb_widget_probe(label):
    import json, ipywidgets
    ip = get_ipython()
    found = []
    for name, w in list(ip.user_ns.items()):
        if name.startswith('_') or not isinstance(w, ipywidgets.interactive): continue
        controls = {c.description: c for c in w.kwargs_widgets}
        if label not in controls: continue
        c = controls[label]
        res = w.f(**w.kwargs)  # the plain function under the widget, with the widget's current values
        data = ip.display_formatter.format(res)[0] if res is not None else {}
        found.append(dict(name=name, function=w.f.__name__, kwargs={k: repr(v) for k, v in w.kwargs.items()},
                          value=c.value if isinstance(c.value, (int, float, str)) else repr(c.value),
                          label=getattr(c, 'label', None), step=getattr(c, 'step', None),
                          html=data.get('text/html'), text=data.get('text/plain')))
    return json.dumps(found)
'''


def kernel_eval(lab, name: str, code: str, expr: str, timeout: float = 60):
    "Run `code` silently in notebook `name`'s kernel and return the value of `expr` (a JSON string) decoded"
    import ast
    from jupyter_client import BlockingKernelClient
    kid = session_for(lab, name)['kernel']['id']
    kc = BlockingKernelClient(connection_file=str(lab['runtime'] / f'kernel-{kid}.json'))
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
        msg_id = kc.execute(code, silent=True, store_history=False, user_expressions={'r': expr})
        while True:
            reply = kc.get_shell_msg(timeout=timeout)
            if reply['parent_header'].get('msg_id') == msg_id: break
        content = reply['content']
        assert content['status'] == 'ok', f"probe failed in the kernel: {content.get('ename')}: {content.get('evalue')}"
        r = content['user_expressions']['r']
        assert r['status'] == 'ok', f"probe failed in the kernel: {r.get('ename')}: {r.get('evalue')}"
        return json.loads(ast.literal_eval(r['data']['text/plain']))
    finally:
        kc.stop_channels()


def norm(s: str) -> str: return ' '.join(s.split())


def readout_matches(readout: str, probe: dict) -> bool:
    "Does the slider's readout in the page show the kernel-side value of the control?"
    if probe['label'] is not None: return readout.strip() == str(probe['label'])
    try: return abs(float(readout) - float(probe['value'])) <= 0.5 * float(probe['step'] or 0) + 1e-6
    except (TypeError, ValueError): return readout.strip() == str(probe['value'])


def check_slider(page, lab, name: str) -> str:
    "Move the first slider one step; what the chapter shows must change and equal the plain function's result"
    slider = page.locator('.jp-OutputArea-output .widget-slider').first
    label = slider.locator('.widget-label').first.inner_text().strip()
    readout = slider.locator('.widget-readout').first
    before_value, before_shown = readout.inner_text(), page.evaluate(SHOWN_JS)
    handle = slider.locator('.noUi-handle').first
    for key in ('ArrowRight', 'ArrowLeft'):  # ArrowLeft when the slider already sits at its maximum
        handle.focus()
        page.keyboard.press(key)
        page.wait_for_timeout(300)
        if readout.inner_text() != before_value: break
    after_value = readout.inner_text()
    assert after_value != before_value, f"slider {label!r} did not move with the arrow keys (readout {before_value!r})"
    wait_until(page, lambda: page.evaluate(SHOWN_JS) != before_shown and kernel_idle(page), 60,
               f"moving slider {label!r} from {before_value} to {after_value} changed nothing the chapter shows")
    in_interact = slider.locator('xpath=ancestor::div[contains(@class,"widget-interact")]').count() > 0
    if not in_interact: return f"{label}: {before_value} -> {after_value}, display changed (not an interact: no oracle)"
    probes = kernel_eval(lab, name, PROBE_CODE, f'_lora_nb_widget_probe({label!r})')
    assert probes, f"slider {label!r} sits in an interact, but no ipywidgets.interactive in the kernel has a control {label!r}"
    p = next((p for p in probes if readout_matches(after_value, p)), None)
    assert p, f"kernel-side value of {label!r} does not match the page's readout {after_value!r}: {probes}"
    out = slider.locator('xpath=ancestor::div[contains(@class,"widget-interact")][1]').locator('.widget-output').first
    shown = norm(out.inner_text())
    if p['html']: expected = norm(page.evaluate(RENDER_HTML_JS, p['html']))
    elif p['text']: expected = norm(p['text'])
    else: return f"{label}: {before_value} -> {after_value}, display changed ({p['function']} returns None: no value to compare)"
    assert shown == expected, (f"after moving {label!r} to {after_value}, the widget shows\n{shown}\nbut "
                               f"{p['function']}({', '.join(f'{k}={v}' for k, v in p['kwargs'].items())}) gives\n{expected}")
    return f"{label}: {before_value} -> {after_value}, shows {p['function']}(**{p['kwargs']})"


# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('name', NOTEBOOKS)
def test_notebook_in_browser(name, browser, lab, artifacts):
    stem, path = Path(name).stem, lab['root'] / name
    t0 = time.time()
    deadline = t0 + TIMEOUT
    page = browser.new_page()
    page.set_default_timeout(30_000)
    phase, t = 'open', time.time()

    def lap(next_phase):  # time each phase, also when it fails
        nonlocal phase, t
        record_timing('browser', f'{stem} {phase}', time.time() - t)
        phase, t = next_phase, time.time()

    try:
        page.goto(f"{lab['url']}/lab/workspaces/{stem}/tree/{name}?reset&token={lab['token']}")
        wait_until(page, lambda: kernel_idle(page), 120, f'{name}: kernel did not become idle after opening')
        lap('run all')
        run_all(page, deadline)
        lap('save+check')
        save(page, path)
        nb = nbformat.read(path, as_version=4)
        problems = saved_problems(nb)
        shown = page.evaluate(PAGE_OUTPUTS_JS)
        n_png, n_widgets = count_saved(nb, 'image/png'), count_saved(nb, WIDGET_MIME)
        if shown['images'] != n_png:
            problems.append(f"{n_png} PNG outputs in the notebook, {shown['images']} images on the page")
        if shown['broken_images']: problems.append(f"{shown['broken_images']} images did not load on the page")
        if shown['live_widgets'] != n_widgets:
            problems.append(f"{n_widgets} widget outputs in the notebook, {shown['live_widgets']} rendered live")
        problems += [f"widget shown as text, not rendered: {txt[:120]!r}" for txt in shown["texts"] if WIDGET_REPR.match(txt)]
        slider = 'no slider'
        if shown['live_widgets'] and page.locator('.jp-OutputArea-output .widget-slider .noUi-handle').count():
            lap('slider')
            try: slider = check_slider(page, lab, name)
            except (AssertionError, pytest.fail.Exception) as e: problems.append(f"widget: {e}")
        assert not problems, f"{name}:\n" + '\n'.join(problems)
        print(f"{name}: {len(nb.cells)} cells ({lab['dropped'].get(name, 0)} flagged cells left out), {n_png} plots, "
              f"{n_widgets} widgets; slider: {slider}")
    finally:
        lap('')
        record_timing('browser', f'{stem} total', time.time() - t0)
        try:
            page.evaluate(SCROLL_TO_SHOW_JS)
            page.wait_for_timeout(300)
            page.screenshot(path=str(artifacts / f'{stem}.png'))
        except Exception as e: print(f'no screenshot of {name}: {e}')
        page.close()
        shutdown_kernels(lab, name)

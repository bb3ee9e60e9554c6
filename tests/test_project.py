"Project-level checks: notebooks and package in sync, notebooks clean, README generated from index.ipynb."
import ast, filecmp, re, shutil, subprocess, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _copy_project(tmp):
    for name in ('pyproject.toml', 'settings.ini', 'README.md'):
        shutil.copy(ROOT/name, tmp/name)
    for name in ('nbs', 'lora_nb'):
        shutil.copytree(ROOT/name, tmp/name, ignore=shutil.ignore_patterns('__pycache__', '.ipynb_checkpoints'))
    return tmp


def _diff(a, b):
    cmp = filecmp.dircmp(a, b, ignore=['__pycache__', '.ipynb_checkpoints'])
    return cmp.diff_files + cmp.left_only + cmp.right_only


def test_export_leaves_package_unchanged(tmp_path):
    tmp = _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev-export'], cwd=tmp, check=True, capture_output=True)
    assert _diff(ROOT/'lora_nb', tmp/'lora_nb') == [], "run nbdev-export: lora_nb/ is out of sync with nbs/"


def test_clean_leaves_notebooks_unchanged(tmp_path):
    tmp = _copy_project(tmp_path)
    subprocess.run([BIN/'nbdev-clean'], cwd=tmp, check=True, capture_output=True)
    assert _diff(ROOT/'nbs', tmp/'nbs') == [], "run nbdev-clean: notebooks are not clean"


def test_readme_is_generated_from_index(tmp_path):
    subprocess.run([BIN/'jupyter', 'nbconvert', '--log-level=ERROR', '--to', 'markdown', '--no-input', str(ROOT/'nbs'/'index.ipynb'),
                    '--output-dir', str(tmp_path), '--output', 'README'], check=True, capture_output=True)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), "README.md drifted: run `make readme`"
    figures = sorted(p.name for p in (tmp_path/'README_files').glob('*.png'))
    assert figures and figures == sorted(p.name for p in (ROOT/'README_files').glob('*.png')), "README_files/ drifted: run `make readme`"
    assert all((tmp_path/'README_files'/f).read_bytes() == (ROOT/'README_files'/f).read_bytes() for f in figures)


def test_every_notebook_is_exported_or_index():
    "Each chapter notebook names its module with default_exp"
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        if nb.name == 'index.ipynb' or nb.name.startswith('_'): continue
        assert '#| default_exp' in nb.read_text(), f"{nb.name} has no #| default_exp"


# The package's structure: checks that fail the build instead of a user's run.
PKG = ROOT/'lora_nb'
MODULES = sorted(p.stem for p in PKG.glob('*.py') if not p.stem.startswith('_'))


def test_no_undefined_or_unused_names():
    "ruff's undefined-name (F821) and unused-import (F401) rules: a name a module uses but never imports fails here"
    r = subprocess.run([BIN/'ruff', 'check', '--no-cache', '--select', 'F821,F401', '--output-format', 'concise', str(PKG)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def _import_alone(module):
    return module, subprocess.run([sys.executable, '-c', f'import lora_nb.{module}'], capture_output=True, text=True, cwd=ROOT)


def test_each_module_imports_alone_and_quietly():
    "Every module imports in a fresh interpreter on its own (no hidden reliance on import order), printing nothing"
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(4) as ex: results = list(ex.map(_import_alone, MODULES))
    failed = {m: r.stderr[-1500:] for m, r in results if r.returncode or r.stderr or r.stdout}
    assert not failed, failed


def _chapter(module) -> int:
    m = re.search(r"# %% \.\./nbs/(\d+)_", (PKG/f'{module}.py').read_text())
    assert m, f"lora_nb/{module}.py has no nbdev export header"
    return int(m.group(1))


def _package_imports(module) -> set:
    "The lora_nb modules `module` imports, at the top or inside functions"
    out = set()
    for n in ast.walk(ast.parse((PKG/f'{module}.py').read_text())):
        if isinstance(n, ast.ImportFrom) and n.level == 1: out |= {n.module.split('.')[0]} if n.module else {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom) and (n.module or '').startswith('lora_nb'):
            rest = n.module.split('.')[1:]
            out |= {rest[0]} if rest else {a.name for a in n.names}
        elif isinstance(n, ast.Import): out |= {a.name.split('.')[1] for a in n.names if a.name.startswith('lora_nb.')}
    return out & set(MODULES)


def test_imports_flow_in_chapter_order():
    "A module imports only modules of earlier chapters (so there is no cycle), also inside functions"
    chapters = {m: _chapter(m) for m in MODULES}
    late = [f"{m} (chapter {chapters[m]}) imports {d} (chapter {chapters[d]})"
            for m in MODULES for d in sorted(_package_imports(m)) if chapters[d] >= chapters[m] and d != m]
    assert not late, late


def test_llama_cpp_extra_pins_the_converters_release():
    "The [llamacpp] extra builds the same llama-cpp-python release whose converters lora_nb.deploy fetches"
    import tomllib
    from lora_nb.deploy import LLAMA_CPP_PYTHON
    extra = tomllib.loads((ROOT/'pyproject.toml').read_text())['project']['optional-dependencies']['llamacpp']
    assert extra == [f'llama-cpp-python=={LLAMA_CPP_PYTHON}'], extra

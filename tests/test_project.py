"Project-level checks: notebooks and package in sync, notebooks clean, README generated from index.ipynb."
import filecmp, shutil, subprocess, sys
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
    subprocess.run([BIN/'jupyter', 'nbconvert', '--log-level=ERROR', '--to', 'markdown', str(ROOT/'nbs'/'index.ipynb'),
                    '--output-dir', str(tmp_path), '--output', 'README'], check=True, capture_output=True)
    assert (tmp_path/'README.md').read_text() == (ROOT/'README.md').read_text(), "README.md drifted: run `make readme`"


def test_every_notebook_is_exported_or_index():
    "Each chapter notebook names its module with default_exp"
    for nb in sorted((ROOT/'nbs').glob('*.ipynb')):
        if nb.name == 'index.ipynb' or nb.name.startswith('_'): continue
        assert '#| default_exp' in nb.read_text(), f"{nb.name} has no #| default_exp"

"""Shared fixtures: the project's paths, free ports, and servers started from the project's own venv.

A tool the tests need (chromium, playwright, tensorboard) that is missing fails the test under CI (`CI=true`)
and skips it, with the reason, on a developer's machine.
"""
from __future__ import annotations
import json, os, shutil, signal, socket, subprocess, sys, time, urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv that runs pytest (make test: .venv/bin)
ARTIFACTS = ROOT / 'tests' / 'artifacts'  # screenshots and timings (git-ignored)


def on_ci() -> bool:
    "True when running under CI (the CI variable set to true/1/yes)"
    return os.environ.get('CI', '').strip().lower() in {'1', 'true', 'yes'}


def require(ok, reason: str):
    "Fail (under CI) or skip (locally) with `reason` unless `ok`"
    if ok: return
    if on_ci(): pytest.fail(f"{reason} (CI=true: a missing tool is a failure)", pytrace=False)
    pytest.skip(reason)


def free_port() -> int:
    "A TCP port on 127.0.0.1 that nothing listens on right now"
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def get_json(url: str, timeout: float = 10):
    "GET `url` and decode the JSON answer"
    with urllib.request.urlopen(url, timeout=timeout) as r: return json.loads(r.read())


def wait_for_http(url: str, proc: subprocess.Popen, log: Path, timeout: float = 120):
    "Poll `url` until it answers 200; fail with the server's log if `proc` exits or time runs out"
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before answering {url}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200: return time.time() - t0
        except OSError: pass
        time.sleep(0.5)
    pytest.fail(f"no answer from {url} after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def stop_process(proc: subprocess.Popen, timeout: float = 20):
    "SIGTERM the process group `proc` leads (server and its kernels), SIGKILL it if it lingers"
    if proc.poll() is not None: return
    try: os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError: return
    try: proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL); proc.wait(10)


def start_server(cmd: list, env: dict, log: Path, cwd=None) -> subprocess.Popen:
    "Start `cmd` in its own process group (so stopping it also stops its children), output to `log`"
    with open(log, 'wb') as f:
        return subprocess.Popen(cmd, env=env, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def venv_tool(name: str) -> Path | None:
    "The venv's own executable `name` (jupyter, tensorboard), or None"
    p = BIN / name
    return p if p.exists() else None


@pytest.fixture(scope='session')
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


_timings: dict = {}

def record_timing(group: str, name: str, seconds: float):
    "Remember a duration; the terminal summary and tests/artifacts/timings.json list them"
    _timings.setdefault(group, {})[name] = round(seconds, 1)


def pytest_terminal_summary(terminalreporter):
    if not _timings: return
    terminalreporter.section('timings (s)')
    for group, d in _timings.items():
        for name, s in d.items(): terminalreporter.write_line(f"{group:12} {name:36} {s:7.1f}")
    totals = [s for name, s in _timings.get('browser', {}).items() if name.endswith(' total')]
    if totals:
        total = sum(totals) + _timings.get('lab', {}).get('server start', 0)
        terminalreporter.write_line(f"browser test: {len(totals)} notebooks in {total:.0f} s"
                                    + (" (over the 300 s CI budget: look at the slowest notebook)" if total > 300 else ''))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / 'timings.json').write_text(json.dumps(_timings, indent=1) + '\n')

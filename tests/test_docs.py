"""The static site `make docs` builds (tools/build_docs.py), checked page by page in a real (headless) Chromium.

The site is built from the committed notebooks into a temporary folder and served by `python -m http.server`;
every page must load, decode each of its images, reach each internal link, show no traceback and list every
chapter in its sidebar. A tiny notebook folder built beside it (an image output, notebook links, a bare chapter
name, a `#| hide` cell) proves the rewriting and the image check on a page that certainly has them.
Screenshots of the home page and of chapter 00 go to tests/artifacts/. Requests that leave 127.0.0.1 are refused
and counted: the site must read offline, its formulas typeset by the MathJax and its saved widgets drawn by the
widget manager it carries in `_static/` (the tiny site, built with `cdn=True`, points at the CDNs instead).
"""
from __future__ import annotations
import base64, concurrent.futures, io, re, sys, urllib.error, urllib.parse, urllib.request

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook, new_output
import pytest

from conftest import ROOT, free_port, require, start_server, stop_process, wait_for_http
from test_browser import CHROMIUM_ARGS, find_chromium

sys.path.insert(0, str(ROOT / 'tools'))
from build_docs import STATIC_URLS, build_site, site_pages

HREFS = [p.href for p in site_pages(ROOT / 'nbs')]  # index.html, 00_lora_math.html, ...
TRACEBACK = 'Traceback (most recent call last)'


def tiny_png() -> str:
    "Base64 of a 40x20 red PNG"
    from PIL import Image
    buf = io.BytesIO()
    Image.new('RGB', (40, 20), 'red').save(buf, 'PNG')
    return base64.b64encode(buf.getvalue()).decode()


def write_tiny_nbs(d):
    "A notebook folder of two chapters, an index naming them bare, and a draft the site must leave out"
    d.mkdir()
    png = new_output('display_data', data={'image/png': tiny_png(), 'text/plain': '<Figure>'})
    chapters = {'00_first': [new_markdown_cell('# First `chapter`'), new_code_cell('#| default_exp first'),
                             new_code_cell('#| hide\nsecret = 1'),
                             new_markdown_cell('See [the second](nbs/01_second.ipynb#part) and [it](01_second.ipynb).'),
                             new_code_cell('#| export\nplot()', outputs=[png])],
                '01_second': [new_markdown_cell('# Second'), new_markdown_cell('## Part')],
                '_draft': [new_markdown_cell('# Draft')],
                'index': [new_markdown_cell('# tiny\n\n| notebook |\n|---|\n| `00_first` |\n| `01_second` |\n| `99_none` |')]}
    for name, cells in chapters.items(): nbformat.write(new_notebook(cells=cells), d / f'{name}.ipynb')


@pytest.fixture(scope='module')
def site(tmp_path_factory):
    "The real site and the tiny one, built under one folder: {'root', 'real': [pages], 'tiny': [pages]}"
    root = tmp_path_factory.mktemp('docs')
    write_tiny_nbs(root / 'tiny_nbs')
    return dict(root=root, real=build_site(root / 'site'), tiny=build_site(root / 'tiny', root / 'tiny_nbs', cdn=True))


def pager(html: str) -> dict:
    "The previous/next hrefs of a page's pager"
    links = re.findall(r'<a [^>]*rel="(?:prev|next)"[^>]*>', html)
    return {re.search(r'rel="(\w+)"', a)[1]: re.search(r'href="([^"]+)"', a)[1] for a in links}


def test_one_page_per_notebook_in_order(site):
    names = [p.name for p in site['real']]
    assert names == HREFS and names[0] == 'index.html'
    assert names[1:] == [p.stem + '.html' for p in sorted((ROOT / 'nbs').glob('[0-9][0-9]_*.ipynb'))]
    pages = {p.name: p.read_text() for p in site['real']}
    chain, here = ['index.html'], 'index.html'
    while 'next' in pager(pages[here]):
        here = pager(pages[here])['next']
        assert pager(pages[here]).get('prev') == chain[-1], f"{here}: prev does not lead back to {chain[-1]}"
        chain.append(here)
    assert chain == HREFS
    assert 'prev' not in pager(pages['index.html'])


def test_links_rewritten_and_images_embedded(site):
    assert [p.name for p in site['tiny']] == ['index.html', '00_first.html', '01_second.html']  # no _draft
    index, first = (site['root'] / 'tiny' / n for n in ('index.html', '00_first.html'))
    index, first = index.read_text(), first.read_text()
    assert '<a href="00_first.html"><code>00_first</code></a>' in index
    assert '<code>99_none</code>' in index and 'href="99_none.html"' not in index  # not a chapter: left alone
    assert 'href="01_second.html#part"' in first and 'href="01_second.html"' in first and '.ipynb' not in first
    assert 'src="data:image/png;base64,' in first
    assert 'secret' not in first and '#|' not in first and '<span class="n">plot</span>' in first
    assert first.count('class="jp-Cell jp-CodeCell') == 1  # the hidden cell and the emptied default_exp are gone
    assert '<title>First chapter – lora_nb</title>' in first and '>First chapter</a>' in first


def test_scripts_carried_or_from_cdn(site):
    real = (site['root'] / 'site' / '00_lora_math.html').read_text()
    for url in STATIC_URLS.values():
        assert f'"{url}"' in real or f"'{url}'" in real, url
        assert (site['root'] / 'site' / url.split('?')[0]).is_file(), url
    assert not re.search(r'src="https?://', real)  # nothing the page loads comes from elsewhere
    tiny = (site['root'] / 'tiny' / '00_first.html').read_text()
    assert 'src="https://cdnjs.cloudflare.com/ajax/libs/mathjax/' in tiny and not (site['root'] / 'tiny' / '_static').exists()


# ---------------------------------------------------------------------------------------------------------------
# in the browser

@pytest.fixture(scope='module')
def server(site):
    "`python -m http.server` on the site's folder; yields its base URL"
    port, log = free_port(), site['root'] / 'http.log'
    proc = start_server([sys.executable, '-m', 'http.server', str(port), '--bind', '127.0.0.1',
                         '--directory', str(site['root'])], None, log)
    url = f'http://127.0.0.1:{port}'
    try:
        wait_for_http(f'{url}/site/index.html', proc, log, timeout=30)
        yield url
    finally:
        stop_process(proc)


def status(url: str) -> int:
    "HTTP status of a GET of `url`"
    try:
        with urllib.request.urlopen(url, timeout=10) as r: return r.status
    except urllib.error.HTTPError as e: return e.code


def look_at_pages(urls: list, shots: dict) -> dict:
    """Open each URL in headless Chromium; {url: facts} (status, images, links, text, sidebar). `shots` maps a URL
    to a screenshot path. Runs in a thread of its own: Playwright's sync API refuses to start in a thread where
    another sync Playwright (test_browser's, in the same pytest session) is running."""
    from playwright.sync_api import sync_playwright
    facts, refused, errors = {}, [], []
    def refuse(route):
        refused.append(route.request.url); route.abort()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=find_chromium(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={'width': 1400, 'height': 1000})
        page.route(re.compile(r'^(?!http://127\.0\.0\.1[:/])'), refuse)  # offline: no CDN
        page.on('pageerror', lambda e: errors.append(str(e)))
        for url in urls:
            refused.clear(); errors.clear()
            response = page.goto(url, wait_until='load')
            if url.endswith('/site/00_lora_math.html'):  # typesetting and widget drawing finish after 'load'
                page.wait_for_selector('.MathJax', timeout=60_000)
                page.wait_for_selector('.widget-slider', timeout=60_000)
                page.wait_for_function('MathJax.Hub.queue.pending === 0 && !MathJax.Hub.queue.running', timeout=60_000)
            facts[url] = dict(
                status=response.status if response else None,
                images=page.eval_on_selector_all('img', 'els => els.map(e => [e.src.slice(0, 60), e.complete, e.naturalWidth])'),
                links=page.eval_on_selector_all('a[href]', 'els => els.map(e => e.getAttribute("href"))'),
                text=page.inner_text('body'),
                sidebar=page.eval_on_selector_all('nav.site-nav a', 'els => els.map(e => e.getAttribute("href"))'),
                formulas=page.eval_on_selector_all('.MathJax, .MathJax_Display', 'els => els.length'),
                widgets=page.eval_on_selector_all('.widget-slider, .widget-dropdown, .widget-checkbox', 'els => els.length'),
                refused=list(refused), errors=list(errors))
            if url in shots: page.screenshot(path=str(shots[url]))
        browser.close()
    return facts


@pytest.fixture(scope='module')
def pages_seen(site, server, artifacts):
    "What Chromium saw on every page of both sites"
    require(find_chromium(), 'chromium not found: apt-get update && apt-get install -y chromium (never `playwright install`)')
    try: import playwright.sync_api  # noqa: F401
    except ImportError: require(False, 'playwright is not installed: .venv/bin/pip install playwright')
    urls = [f'{server}/site/{h}' for h in HREFS] + [f'{server}/tiny/{p.name}' for p in site['tiny']]
    shots = {f'{server}/site/index.html': artifacts / 'docs_index.png',
             f'{server}/site/00_lora_math.html': artifacts / 'docs_00_lora_math.png'}
    with concurrent.futures.ThreadPoolExecutor(1) as pool: return pool.submit(look_at_pages, urls, shots).result(600)


def internal(href: str) -> bool:
    return not re.match(r'(https?|mailto|data|javascript):|#', href)


@pytest.mark.parametrize('href', [f'site/{h}' for h in HREFS] + ['tiny/00_first.html'])
def test_page_in_browser(href, site, server, pages_seen):
    url = f'{server}/{href}'
    seen = pages_seen[url]
    assert seen['status'] == 200
    bad = [img for img in seen['images'] if not (img[1] and img[2] > 0)]
    assert not bad, f"images not decoded (src, complete, naturalWidth): {bad}"
    if href.startswith('tiny/'): assert len(seen['images']) == 1  # the image check did look at an image
    targets = {urllib.parse.urljoin(url, h).split('#')[0] for h in seen['links'] if internal(h)}
    broken = sorted(t for t in targets if status(t) != 200)
    assert not broken, f"internal links that do not answer 200: {broken}"
    assert TRACEBACK not in seen['text']
    chapters = HREFS if href.startswith('site/') else [p.name for p in site['tiny']]
    assert seen['sidebar'] == chapters
    if href.startswith('site/'): assert not seen['refused'], f"requests that left the site: {seen['refused']}"
    assert not seen['errors'], f"script errors: {seen['errors']}"


def test_formulas_typeset_and_widgets_drawn_offline(server, pages_seen):
    seen = pages_seen[f'{server}/site/00_lora_math.html']
    assert seen['formulas'] >= 20 and not re.search(r'\$[^$\n]{1,60}\$', seen['text'])  # no TeX source left showing
    assert seen['widgets'] >= 4  # the rank slider, dropdowns and checkbox of the chapter's saved widgets

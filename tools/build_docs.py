"""Render the notebooks, with their saved outputs, to a static HTML site (no quarto needed).

`nbs/index.ipynb` becomes the home page `index.html`; every chapter `nbs/NN_name.ipynb` becomes `NN_name.html`.
Nothing is executed: a page shows what the notebook last saved (`make notebooks` fills the outputs in).
Each page gets a sidebar listing Home and every chapter, and previous/next links at its foot; markdown links to
notebooks (`NN_name.ipynb`, `nbs/NN_name.ipynb`) and the index table's bare chapter names (`` `NN_name` ``) point at
the pages. Cells flagged `#| hide` are left out and `#|` directive lines dropped (a cell left empty goes too),
as nbdev's own docs do.
The site reads offline: the scripts the lab template would take from a CDN are copied into `_static/`: MathJax
(the package jupyter-server-mathjax carries it) typesets the formulas, and the widget manager that renders saved
widget state (npm's @jupyter-widgets/html-manager, with require.js) draws the widgets; the two npm packages are
fetched once with `npm pack` into lora_nb's cache folder. `--cdn` keeps the CDN addresses instead (no npm needed).
The site is written to a temporary folder beside `out_dir` and moved into place, so a failed build leaves
the previous site whole.

    .venv/bin/python tools/build_docs.py --output _docs
"""
from __future__ import annotations
import argparse, importlib.util, re, shutil, subprocess, sys, tarfile, tempfile
from dataclasses import dataclass
from pathlib import Path

import nbformat
from jinja2 import DictLoader
from nbconvert import HTMLExporter

from lora_nb.core import LoraNbError, build_atomically, cache_dir

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT / 'nbs'

# the lab template plus the site's sidebar and pager; `resources.site` carries this page's place in the site
TEMPLATE = r"""{%- extends 'index.html.j2' -%}
{% block html_head_css %}<style>
body.jp-Notebook { margin-left: 250px; }
nav.site-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 230px; overflow-y: auto; padding: 16px 10px;
  box-sizing: border-box; background: #f6f7f9; border-right: 1px solid #ddd; font: 14px/1.4 sans-serif; z-index: 10; }
nav.site-nav ol { list-style: none; padding: 0; margin: 0; }
nav.site-nav li { margin: 2px 0; }
nav.site-nav a { display: block; padding: 3px 6px; border-radius: 4px; color: #1a4f8b; text-decoration: none; }
nav.site-nav a:hover { background: #e6ebf2; }
nav.site-nav a[aria-current] { background: #1a4f8b; color: #fff; }
nav.site-nav .num { display: inline-block; width: 1.8em; color: #888; }
nav.site-nav a[aria-current] .num { color: #cfd9e6; }
nav.site-pager { display: flex; justify-content: space-between; margin: 32px 0 48px; padding-top: 12px;
  border-top: 1px solid #ddd; font: 15px sans-serif; }
nav.site-pager a { color: #1a4f8b; text-decoration: none; }
.jp-RenderedMarkdown a code { color: #1a4f8b; text-decoration: underline; }
@media (max-width: 800px) { body.jp-Notebook { margin-left: 0; } nav.site-nav { position: static; width: auto; } }
</style>{% endblock html_head_css %}
{% block body_header %}{{ super() }}
<nav class="site-nav" aria-label="chapters"><ol>
{%- for p in resources.site.pages %}
<li><a href="{{ p.href }}"{% if p.href == resources.site.here %} aria-current="page"{% endif %}>
{%- if p.number %}<span class="num">{{ p.number }}</span>{% endif %}{{ p.title | e }}</a></li>
{%- endfor %}
</ol></nav>
{% endblock body_header %}
{% block body_footer %}
<nav class="site-pager" aria-label="previous and next">
<span>{% if resources.site.prev %}<a rel="prev" href="{{ resources.site.prev.href }}">&larr; {{ resources.site.prev.title | e }}</a>{% endif %}</span>
<span>{% if resources.site.next %}<a rel="next" href="{{ resources.site.next.href }}">{{ resources.site.next.title | e }} &rarr;</a>{% endif %}</span>
</nav>
{{ super() }}{% endblock body_footer %}
"""

# what the pages load instead of a CDN (relative to the site): MathJax 2 as nbconvert's template configures it, the
# widget manager that matches ipywidgets 8's saved state (html-manager 1.x) and the AMD loader it needs
NPM_ASSETS = {'html-manager': '@jupyter-widgets/html-manager@1.0.15', 'requirejs': 'requirejs@2.3.8'}
STATIC_URLS = dict(mathjax_url='_static/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full,Safe',
                   require_js_url='_static/requirejs/require.js',
                   widget_renderer_url='_static/html-manager/dist/embed-amd.js')

NB_LINK = re.compile(r'\]\((?:\./)?(?:nbs/)?(\d\d_\w+|index)\.ipynb(#[^)\s]*)?\)')  # ](nbs/07_monitors.ipynb#x)
DIRECTIVE = re.compile(r'^#\|\s*([\w-]+)')


@dataclass
class Page:
    "One notebook of the site: where it comes from, where it goes, what the sidebar calls it"
    src: Path
    href: str
    title: str
    number: str = ''  # '07' for chapters, '' for the home page


def notebook_title(nb) -> str:
    "Text of the notebook's first `# ` heading (backticks dropped), or '' if it has none"
    for cell in nb.cells:
        if cell.cell_type != 'markdown': continue
        for line in cell.source.splitlines():
            if line.startswith('# '): return line[2:].replace('`', '').strip()
    return ''


def site_pages(nbs_dir: Path) -> list[Page]:
    "Home (index.ipynb) then every `NN_*.ipynb` chapter, sorted; names starting with `_` are left out"
    pages = []
    index = nbs_dir / 'index.ipynb'
    if index.exists(): pages.append(Page(index, 'index.html', 'Home'))
    for src in sorted(nbs_dir.glob('[0-9][0-9]_*.ipynb')):
        title = notebook_title(nbformat.read(src, as_version=4)) or src.stem
        pages.append(Page(src, f'{src.stem}.html', title, src.stem[:2]))
    return pages


def link_chapters(md: str, chapters: set) -> str:
    "Markdown `md` with notebook links and bare `` `NN_name` `` chapter names pointing at the chapters' pages"
    md = NB_LINK.sub(lambda m: f']({m[1]}.html{m[2] or ""})', md)
    return re.sub(r'(?<![\[\w])`(\d\d_\w+)`',
                  lambda m: f'[`{m[1]}`]({m[1]}.html)' if m[1] in chapters else m[0], md)


def prepare(nb, chapters: set):
    "The notebook as the site shows it: `#| hide` cells out, directive lines dropped, chapter links rewritten"
    cells = []
    for cell in nb.cells:
        if cell.cell_type == 'markdown': cell.source = link_chapters(cell.source, chapters)
        elif cell.cell_type == 'code':
            lines = cell.source.splitlines()
            flags = [m[1] for line in lines if (m := DIRECTIVE.match(line))]
            cell.source = '\n'.join(l for l in lines if not DIRECTIVE.match(l)).strip('\n')
            if 'hide' in flags or not (cell.source or cell.outputs): continue  # e.g. a lone `#| default_exp`
        cells.append(cell)
    nb.cells = cells
    return nb


def npm_package(spec: str, cache=None) -> Path:
    "Folder of npm package `spec` ('name@version'), unpacked once into `cache` (lora_nb's cache folder) by `npm pack`"
    dest = Path(cache or cache_dir() / 'docs-assets') / spec.replace('/', '+')
    def fetch(tmp: Path):
        if not shutil.which('npm'): raise LoraNbError(f"npm not found: it fetches {spec} for the docs (or build with --cdn)")
        r = subprocess.run(['npm', 'pack', '--silent', spec, '--pack-destination', str(tmp)], capture_output=True, text=True)
        tgz = sorted(tmp.glob('*.tgz'))
        if r.returncode or not tgz: raise LoraNbError(f"npm pack {spec} failed: {(r.stderr or r.stdout).strip()[-500:]}")
        with tarfile.open(tgz[0]) as t: t.extractall(tmp, filter='data')  # the tarball's files sit under package/
        tgz[0].unlink()
    return build_atomically(dest, fetch) / 'package'


def copy_static(static: Path, cache=None):
    "Copy MathJax, the widget manager and require.js into the site's `static` folder (source maps left out)"
    spec = importlib.util.find_spec('jupyter_server_mathjax')  # found, not imported (that would load jupyter_server)
    if spec is None: raise LoraNbError("jupyter-server-mathjax is not installed (it carries MathJax): make install")
    shutil.copytree(Path(spec.origin).parent / 'static', static / 'mathjax')  # MathJax 2: what nbconvert configures
    skip = shutil.ignore_patterns('*.map', 'src', 'lib', 'embed.js', 'libembed-amd.js')  # pages load embed-amd.js
    for name, package in NPM_ASSETS.items(): shutil.copytree(npm_package(package, cache), static / name, ignore=skip)


def render_page(page: Page, pages: list[Page], exporter: HTMLExporter) -> str:
    "HTML of one page: its notebook's saved outputs, the sidebar and the previous/next links"
    i = pages.index(page)
    chapters = {p.src.stem for p in pages if p.number}
    nb = prepare(nbformat.read(page.src, as_version=4), chapters)
    nb.metadata['title'] = f'{page.title} – lora_nb' if page.number else 'lora_nb'
    site = dict(pages=pages, here=page.href, prev=pages[i - 1] if i else None,
                next=pages[i + 1] if i + 1 < len(pages) else None)
    body, _ = exporter.from_notebook_node(nb, resources={'metadata': {'name': page.src.stem, 'path': str(page.src.parent)},
                                                         'site': site})
    return body


def build_site(out_dir, nbs_dir=NBS, cdn=False) -> list[Path]:
    """Render every page of `nbs_dir` into `out_dir` (replaced whole, atomically); the paths of the pages written.
    The scripts the pages load are copied into `out_dir/_static` unless `cdn` keeps nbconvert's CDN addresses."""
    out_dir, pages = Path(out_dir).resolve(), site_pages(Path(nbs_dir))
    exporter = HTMLExporter(template_name='lab', extra_loaders=[DictLoader({'site.html.j2': TEMPLATE})],
                            embed_images=True,  # images a markdown cell links to become data URIs too
                            exclude_input_prompt=True, exclude_output_prompt=True,  # counts are cleaned away
                            **({} if cdn else STATIC_URLS))
    exporter.template_file = 'site.html.j2'
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}-', dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the site from a web server's user
    try:
        if not cdn: copy_static(tmp / '_static')
        for page in pages: (tmp / page.href).write_text(render_page(page, pages, exporter), encoding='utf-8')
        old = out_dir.with_name(f'.{out_dir.name}-old')
        shutil.rmtree(old, ignore_errors=True)
        if out_dir.exists(): out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [out_dir / p.href for p in pages]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--output', default='_docs', help='folder of the site (replaced whole)')
    ap.add_argument('--nbs', default=str(NBS), help='folder of the notebooks')
    ap.add_argument('--cdn', action='store_true', help='pages load MathJax and the widget manager from CDNs')
    args = ap.parse_args(argv)
    try: written = build_site(args.output, args.nbs, args.cdn)
    except LoraNbError as e: sys.exit(f'error: {e}')
    for p in written: print(f'{p.stat().st_size / 1e3:8.0f} kB  {p}')
    print(f'{len(written)} pages, {sum(p.stat().st_size for p in written) / 1e6:.1f} MB in {Path(args.output)}')


if __name__ == '__main__': main()

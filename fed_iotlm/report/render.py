"""Write a :class:`Page` as Markdown or HTML with jinja2, atomically.

The HTML links the PNGs next to it instead of embedding them as base64: the Markdown
page needs the files anyway, the HTML of a 200-run study stays small enough to open
quickly, and each figure stays a file one can drop into a paper or an issue.  Copy the
report directory as a whole.
"""

from __future__ import annotations

import re
from pathlib import Path

import jinja2
from markupsafe import Markup, escape

from fed_iotlm.atomic import atomic_write_text

from .page import Page, Table

MARKDOWN = """\
# {{ page.title }}

{% for line in page.summary %}- {{ line }}
{% endfor %}
{% for s in page.sections %}
## {{ s.title }}

{% for t in s.text %}{{ t }}

{% endfor %}{% for f in s.figures %}![{{ f.alt }}]({{ f.file }})

{% endfor %}{% for t in s.tables %}{% if t.caption %}{{ t.caption }}

{% endif %}| {{ t.columns | map('md') | join(' | ') }} |
|{% for n in t.numeric %}{{ '---:' if n else '---' }}|{% endfor %}
{% for row in t.rows %}| {{ row | map('md') | join(' | ') }} |
{% endfor %}
{% endfor %}{% endfor %}
{% if page.omitted %}## Not in this report

{% for line in page.omitted %}- {{ line }}
{% endfor %}{% endif %}
{% if page.footnotes %}Long param values:

{% for line in page.footnotes %}- `{{ line }}`
{% endfor %}{% endif %}"""

HTML = """\
<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{{ page.title }}</title>
<style>
body { font-family: system-ui, sans-serif; max-width: 75rem; margin: 2rem auto; padding: 0 1rem;
       color: #222; line-height: 1.45; }
table { border-collapse: collapse; margin: .5rem 0 1.5rem; font-size: .85rem; }
th, td { border-bottom: 1px solid #ddd; padding: .25rem .6rem; text-align: left; }
th { background: #f3f3f3; position: sticky; top: 0; }
td.n, th.n { text-align: right; font-variant-numeric: tabular-nums; }
caption { caption-side: top; text-align: left; color: #555; padding-bottom: .3rem; }
img { max-width: 100%; border: 1px solid #eee; }
code { background: #f3f3f3; padding: 0 .2rem; }
.summary { background: #f7f9fc; border-left: 4px solid #4a7bd0; padding: .5rem 1rem; }
.notes { color: #666; }
</style></head>
<body>
<h1>{{ page.title }}</h1>
<ul class="summary">{% for line in page.summary %}<li>{{ line | inline }}</li>{% endfor %}</ul>
{% for s in page.sections %}
<h2>{{ s.title }}</h2>
{% for t in s.text %}<p>{{ t | inline }}</p>{% endfor %}
{% for f in s.figures %}<p><img src="{{ f.file }}" alt="{{ f.alt }}"></p>{% endfor %}
{% for t in s.tables %}
{% if s.collapse_tables and loop.last %}<details><summary>{{ t.rows | length }} rows</summary>{% endif %}
<table>{% if t.caption %}<caption>{{ t.caption | inline }}</caption>{% endif %}
<thead><tr>{% for c in t.columns %}<th{% if t.numeric[loop.index0] %} class="n"{% endif %}>{{ c }}</th>{% endfor %}</tr></thead>
<tbody>{% for row in t.rows %}<tr>{% for cell in row %}<td{% if t.numeric[loop.index0] %} class="n"{% endif %}>{{ cell }}</td>{% endfor %}</tr>
{% endfor %}</tbody></table>
{% if s.collapse_tables and loop.last %}</details>{% endif %}
{% endfor %}{% endfor %}
{% if page.omitted %}<h2>Not in this report</h2>
<ul class="notes">{% for line in page.omitted %}<li>{{ line | inline }}</li>{% endfor %}</ul>{% endif %}
{% if page.footnotes %}<p class="notes">Long param values:</p>
<ul class="notes">{% for line in page.footnotes %}<li><code>{{ line }}</code></li>{% endfor %}</ul>{% endif %}
</body></html>
"""


def _md_cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table) -> str:
    """One table as Markdown, its caption above it: what a study page embeds and what
    ``fed-iotlm report --study`` prints (the same cells the page template writes)."""
    lines = [table.caption, ""] if table.caption else []
    lines.append("| " + " | ".join(_md_cell(c) for c in table.columns) + " |")
    lines.append("|" + "".join("---:|" if n else "---|" for n in table.numeric))
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in table.rows]
    return "\n".join(lines) + "\n"


def _inline(text: str) -> Markup:
    """The few Markdown marks the builders use (`code`, **bold**) as HTML, after escaping."""
    html = str(escape(text))
    html = re.sub(r"`([^`]+)`", r"<code>\1</code>", html)
    html = re.sub(r"\*\*([^*]+)\*\*", r"<b>\1</b>", html)
    return Markup(html)


def _env(autoescape: bool) -> jinja2.Environment:
    env = jinja2.Environment(autoescape=autoescape, undefined=jinja2.StrictUndefined,
                             keep_trailing_newline=True)  # fmt: skip
    env.filters["md"] = _md_cell
    env.filters["inline"] = _inline
    return env


def write(page: Page, out: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write ``report.md`` and/or ``report.html`` into ``out``; return their paths."""
    written = []
    for fmt in formats:
        template = _env(fmt == "html").from_string(HTML if fmt == "html" else MARKDOWN)
        text = template.render(page=page)
        if fmt == "md":
            text = re.sub(r"\n{3,}", "\n\n", text)
        path = out / f"report.{fmt}"
        atomic_write_text(path, text)
        written.append(path)
    return written

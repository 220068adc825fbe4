"""An HTML template for ``dvc plots show --html-template`` that renders without network access.

DVC's default page loads vega, vega-lite and vega-embed from a CDN, so offline every chart is blank. This writes
a template with the three libraries inlined, read from the npm packages that ``make plots`` installs from
``pipeline/report/vega/package-lock.json`` (nothing is fetched when the page opens):

    python -m pipeline.report.offline_html --node-modules .vega/node_modules --out .vega/dvc_plots.html
    dvc plots show --html-template .vega/dvc_plots.html -o dvc_plots
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from pipeline.files import write_text

# Browser builds, in load order (vega-embed needs vega and vega-lite as globals).
LIBRARIES = (
    ("vega", "build/vega.min.js"),
    ("vega-lite", "build/vega-lite.min.js"),
    ("vega-embed", "build/vega-embed.min.js"),
)
# Placeholders dvc-render fills: {plot_divs} (required) and {refresh_tag}. {scripts} is left out on purpose: it
# is where DVC puts its CDN <script src=...> tags.
PLOTS, REFRESH, SCRIPTS = "{plot_divs}", "{refresh_tag}", "{scripts}"

PAGE = """<!DOCTYPE html>
<html>
<head>
    <meta charset="utf-8">
    {refresh_tag}
    <title>DVC plots</title>
    <!-- vega, vega-lite, vega-embed inlined from npm packages ({versions}) so the page renders offline -->
    {libraries}
    <style>
        body {{ font-family: sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {plot_divs}
</body>
</html>
"""


def library_scripts(node_modules: Path) -> tuple[str, list[str]]:
    """Inline ``<script>`` elements of the three libraries and their ``name@version`` list."""
    scripts, versions = [], []
    for name, rel in LIBRARIES:
        pkg, js = node_modules / name / "package.json", node_modules / name / rel
        if not js.is_file() or not pkg.is_file():
            raise FileNotFoundError(f"{js} not found: install the packages first (`make plots` runs npm ci)")
        code = js.read_text(encoding="utf-8")
        # dvc-render substitutes these strings anywhere in the page, the inlined code included.
        if any(p in code for p in (PLOTS, REFRESH, SCRIPTS)):
            raise ValueError(f"{js} contains a dvc-render placeholder ({PLOTS}, {REFRESH}, {SCRIPTS})")
        # A literal "</script" would end the element early; "<\/script" means the same inside JS strings.
        code = re.sub(r"</(script)", r"<\\/\1", code, flags=re.IGNORECASE)
        scripts.append(f'<script type="text/javascript">\n{code}\n</script>')
        versions.append(f"{name}@{json.loads(pkg.read_text())['version']}")
    return "\n    ".join(scripts), versions


def offline_template(node_modules: Path) -> str:
    """The template's text: DVC's page layout with the libraries inlined instead of its ``{scripts}``."""
    scripts, versions = library_scripts(node_modules)
    # str.replace, not format: the inlined code is full of braces.
    return (
        PAGE.replace("{{", "{")
        .replace("}}", "}")
        .replace("{versions}", ", ".join(versions))
        .replace("{libraries}", scripts)
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--node-modules", type=Path, required=True, help="folder holding vega, vega-lite, vega-embed")
    ap.add_argument("--out", type=Path, required=True, help="the template to write")
    args = ap.parse_args(argv)
    try:
        write_text(args.out, offline_template(args.node_modules))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

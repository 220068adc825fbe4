"""The offline page template for `dvc plots show`: the chart libraries inlined, DVC's CDN scripts left out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dvc_render.html import HTML

from pipeline.report import offline_html


def fake_packages(root: Path, code: dict[str, str]) -> Path:
    """node_modules with the three packages' browser builds (their text given)."""
    for name, rel in offline_html.LIBRARIES:
        js = root / name / rel
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(code.get(name, f"window['{name}'] = 1;"))
        (root / name / "package.json").write_text(json.dumps({"name": name, "version": "1.2.3"}))
    return root


def test_template_inlines_the_libraries_in_order(tmp_path: Path) -> None:
    nm = fake_packages(tmp_path / "node_modules", {"vega-embed": "var s = '</script>'; var t = '</SCRIPT>';"})
    page = offline_html.offline_template(nm)
    # dvc-render's own filling: the page keeps no CDN script and gets the plots.
    html = HTML(page).with_scripts('<script src="https://cdn.jsdelivr.net/npm/vega@5"></script>')
    html.with_element("<div id='plot'></div>")
    out = html.embed()
    assert "cdn.jsdelivr" not in out and "<div id='plot'></div>" in out
    assert out.index("window['vega']") < out.index("window['vega-lite']") < out.index("var s =")
    assert "vega@1.2.3, vega-lite@1.2.3, vega-embed@1.2.3" in out
    # A "</script" inside the code would close the element early: escaped, the string means the same in JS.
    assert "'<\\/script>'" in out and "'<\\/SCRIPT>'" in out and out.count("</script>") == 3


def test_missing_package_or_placeholder_is_an_error(tmp_path: Path, capsys) -> None:
    out = tmp_path / "t.html"
    assert offline_html.main(["--node-modules", str(tmp_path / "none"), "--out", str(out)]) == 1
    assert "make plots" in capsys.readouterr().err and not out.exists()
    nm = fake_packages(tmp_path / "nm", {"vega": "x = '{plot_divs}';"})
    with pytest.raises(ValueError, match="placeholder"):
        offline_html.offline_template(nm)

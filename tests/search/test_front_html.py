"""The interactive HTML front: self-contained, every plottable trial drawn, front highlighted."""

import xml.etree.ElementTree as ET

from prunetune.search.front_html import render_front_html
from prunetune.search.pareto import Objective

OBJ = [Objective("val_acc", "max"), Objective("macs", "min")]


def _svg(page: str) -> ET.Element:
    return ET.fromstring(page[page.index("<svg"): page.index("</svg>") + 6])


def test_points_styles_and_tooltips():
    recs = [{"trial_id": "a", "status": "finished", "val_acc": 0.9, "macs": 2e6, "policy": "sap"},
            {"trial_id": "b", "status": "finished", "val_acc": 0.8, "macs": 3e6},
            {"trial_id": "c", "status": "stopped", "val_acc": 0.5, "macs": 1e6},
            {"trial_id": "d", "status": "error"}]
    page = render_front_html(recs, {"a"}, OBJ, title="t <x>", parent={"val_acc": 0.95, "macs": 4e6})
    assert "t &lt;x&gt;" in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    circles = _svg(page).findall("{http://www.w3.org/2000/svg}circle")
    assert len(circles) == 4, "three trials with both values + the parent"
    fills = {c.find("{http://www.w3.org/2000/svg}title").text.split("\n")[0]: c.get("fill") for c in circles}
    assert fills["trial_id: a"] == "#d62728" and fills["trial_id: c"] == "none"
    assert "policy: sap" in page and page.count("<tr class='front'>") == 1


def test_empty_search_still_renders():
    page = render_front_html([], set(), OBJ, title="empty")
    assert "no trial has both plotted values yet" in page

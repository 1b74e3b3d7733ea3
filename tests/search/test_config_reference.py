"""docs/config.md is generated from the config models; it must match them."""

from pathlib import Path

from prunetune.search.config import ExperimentConfig
from prunetune.search.config_reference import render

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"


def test_docs_config_md_is_current():
    assert DOC.read_text() == render(), "regenerate: python -m prunetune.search.config_reference > docs/config.md"


def test_every_key_is_documented():
    text = render()
    for name in ExperimentConfig.model_fields:
        assert f"| `{name}` |" in text

"""What users read stays true: the README's settings table is the settings table."""

from __future__ import annotations

from support import ROOT

from wsserver.config import settings_markdown


def test_readme_settings_table_matches_the_code():
    readme = (ROOT / "README.md").read_text()
    assert settings_markdown() in readme, (
        "README.md's settings table is stale: replace it with the output of "
        "python -c 'from wsserver.config import settings_markdown; print(settings_markdown())'"
    )

"""The documentation stays true to the code: the configuration reference is the one the
settings models generate, every setting has a description, the example config is valid, and
the links between the documents lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

from pgproxy import docs_config
from pgproxy.config import DatabaseConfig, PeerConfig, Settings, UserConfig
from pgproxy.config_file import load_settings

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"
# Relative Markdown links: [text](target#anchor), target without a scheme (or empty).
_LINK = re.compile(r"\]\((?![a-z]+:)([^)#\s]*)(?:#([^)\s]*))?\)")


def _documented_keys() -> set[str]:
    """Keys in the first column of a table of the generated configuration reference."""
    keys = set()
    for line in REFERENCE.read_text(encoding="utf-8").splitlines():
        if line.startswith("| `"):
            keys.add(line.split("`")[1])
    return keys


def test_every_setting_is_in_the_configuration_reference() -> None:
    expected = set(Settings.model_fields)
    expected |= {f"databases.NAME.{name}" for name in DatabaseConfig.model_fields}
    expected |= {f"users.NAME.{name}" for name in UserConfig.model_fields}
    expected |= {f"peers.ID.{name}" for name in PeerConfig.model_fields}
    documented = _documented_keys()
    assert expected <= documented, sorted(expected - documented)


def test_every_setting_has_a_description() -> None:
    assert docs_config.undocumented() == []


def test_configuration_reference_is_up_to_date() -> None:
    """docs/configuration.md is what ``python -m pgproxy.docs_config`` writes: run it after
    changing a setting's description, default or restart rule."""
    assert REFERENCE.read_text(encoding="utf-8") == docs_config.render()


def test_generator_check_mode_agrees(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n", encoding="utf-8")
    assert docs_config.main(["--check", "-o", str(stale)]) == 1
    assert docs_config.main(["-o", str(stale)]) == 0
    assert docs_config.main(["--check", "-o", str(stale)]) == 0
    assert stale.read_text(encoding="utf-8") == REFERENCE.read_text(encoding="utf-8")


def _anchors(document: Path) -> set[str]:
    """GitHub's anchors for the headings of a Markdown file."""
    headings = re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_links_between_documents_resolve() -> None:
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    documents += [ROOT / "bench" / "README.md", ROOT / "bench" / "RESULTS.md"]
    broken = []
    for document in documents:
        for target, anchor in _LINK.findall(document.read_text(encoding="utf-8")):
            linked = document.parent / target if target else document
            if not linked.exists() or (anchor and anchor not in _anchors(linked)):
                broken.append(f"{document.relative_to(ROOT)}: {target}#{anchor}")
    assert not broken, broken


def test_readme_stays_a_product_page() -> None:
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250


def test_example_config_is_valid() -> None:
    settings = load_settings(str(ROOT / "config" / "pgproxy.toml"))
    appdb = settings.databases["appdb"]
    assert appdb.password is not None and appdb.password.get_secret_value() == "change-me"
    assert settings.pool_mode_for(appdb, "reporting") == "session"
    assert settings.pool_mode_for(appdb, "someone") == "transaction"

"""The documentation users read: README.rst renders cleanly and names what it must."""

from pathlib import Path

import docutils.core
import docutils.utils

from imgproxy.config import OPTIONS

README = Path(__file__).parent.parent / "README.rst"


def test_readme_renders_without_warnings():
    """README.rst is valid reStructuredText (docutils reports nothing at warning level)."""
    docutils.core.publish_doctree(
        README.read_text(), settings_overrides={"halt_level": docutils.utils.Reporter.WARNING_LEVEL}
    )


def test_readme_documents_every_option():
    """Every command-line option appears in README.rst."""
    text = README.read_text()
    missing = [o.name for o in OPTIONS if f"--{o.name}" not in text]
    assert missing == []


def test_readme_has_the_set_up_commands():
    """The two set-up commands are in the README."""
    text = README.read_text()
    assert "make run" in text and "make test" in text

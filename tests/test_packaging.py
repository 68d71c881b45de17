"""Packaging: a regular (non-editable) install ships the twistd plugin and nothing stray."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_wheel_contents(tmp_path):
    """The wheel holds imgproxy and the plugin file, never twisted/__init__.py or tests."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("imageproxy-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "twisted/plugins/imageproxy_plugin.py" in names
    assert {"imgproxy/tap.py", "imgproxy/web.py", "imgproxy/py.typed"} <= names
    assert "twisted/__init__.py" not in names
    assert "twisted/plugins/__init__.py" not in names
    assert not any(name.startswith("tests/") for name in names)
    assert not any(name.endswith("dropin.cache") for name in names)


def test_plugin_file_imports_nothing_else():
    """The plugin module is one ServiceMaker statement: twistd loads it cheaply."""
    source = (ROOT / "twisted" / "plugins" / "imageproxy_plugin.py").read_text()
    imports = [line for line in source.splitlines() if line.startswith(("import", "from"))]
    assert imports == ["from twisted.application.service import ServiceMaker"]

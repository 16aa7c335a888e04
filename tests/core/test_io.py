"""seed_lightning/core/io.py: the one atomic writer, and that every file the package writes goes through it."""

import ast
import json

import pytest

from seed_lightning.core.io import atomic_open, write_json_atomic
from tests.cli_runs import REPO


def test_json_is_written_whole_with_no_temporary_left(tmp_path):
    path = tmp_path / "new" / "metrics.json"
    assert write_json_atomic(path, {"CIDEr": 1.5}, indent=2) == path
    assert json.loads(path.read_text()) == {"CIDEr": 1.5}
    assert path.read_text().endswith("}\n")
    assert [p.name for p in path.parent.iterdir()] == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "record.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_open(path, "w") as file:
            file.write("half of the new")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]


def test_the_file_is_replaced_by_a_rename_not_rewritten_in_place(tmp_path):
    """A reader that opened the old file keeps reading the old content (it is never truncated)."""
    path = tmp_path / "manifest.json"
    write_json_atomic(path, {"shards": [1]})
    with open(path) as reader:
        write_json_atomic(path, {"shards": [1, 2]})
        assert json.loads(reader.read()) == {"shards": [1]}
    assert json.loads(path.read_text()) == {"shards": [1, 2]}


def test_before_replace_sees_the_complete_temporary_file(tmp_path):
    path = tmp_path / "chunk.bin"
    seen = []
    with atomic_open(path, before_replace=lambda temporary: seen.append((temporary.read_bytes(), path.exists()))):
        pass
    with atomic_open(path, before_replace=lambda temporary: seen.append((temporary.read_bytes(), path.exists()))) as f:
        f.write(b"data")
    assert seen == [(b"", False), (b"data", True)]
    assert path.read_bytes() == b"data"


def test_only_whole_file_modes():
    with pytest.raises(ValueError, match="mode 'wb' or 'w'"):
        with atomic_open("x", "a"):
            pass


def _writes(tree: ast.AST) -> list[int]:
    """Lines of `path.write_text/write_bytes(...)`, `json.dump(...)`, `tempfile.mkstemp(...)`, `os.replace(...)`
    and `open(..., "w"/"x"/"a"...)`: files written around core/io.py."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        function = node.func
        if isinstance(function, ast.Attribute) and function.attr in ("write_text", "write_bytes", "mkstemp"):
            lines.append(node.lineno)
        elif isinstance(function, ast.Attribute) and isinstance(function.value, ast.Name) and (
            (function.value.id, function.attr) in (("json", "dump"), ("os", "replace"))
        ):
            lines.append(node.lineno)
        elif isinstance(function, ast.Name) and function.id == "open":
            mode = node.args[1] if len(node.args) > 1 else next((k.value for k in node.keywords if k.arg == "mode"), None)
            if isinstance(mode, ast.Constant) and isinstance(mode.value, str) and mode.value[:1] in "wxa":
                lines.append(node.lineno)
    return lines


# Renames that are not whole-file writes: a streamed token shard (TarWriter into NAME.tar.tmp, fsynced and hashed
# first), and the hard link that keeps the previous last.ckpt.
ALLOWED = {("seed_lightning/mllm/tokens.py", "os.replace(temporary, path)"),
           ("seed_lightning/core/checkpointing.py", "os.replace(staging, keep)")}


def test_every_file_the_package_writes_goes_through_core_io():
    offenders = []
    for path in sorted((REPO / "seed_lightning").rglob("*.py")):
        name = str(path.relative_to(REPO))
        if name == "seed_lightning/core/io.py":
            continue
        source = path.read_text()
        for line in _writes(ast.parse(source)):
            text = source.splitlines()[line - 1].strip()
            if not any(name == allowed and call in text for allowed, call in ALLOWED):
                offenders.append(f"{name}:{line}: {text}")
    assert not offenders, "write through seed_lightning.core.io instead:\n" + "\n".join(offenders)

"""pipelines/files.py: a target is the whole new file or what it was before, never a part, and no
temporary outlives a failed writer; what imports it from models/ loads no DALI or Kornia."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipelines.files import atomic_write, atomic_write_bytes, atomic_write_text, target_name, temporary_path

ROOT = Path(__file__).resolve().parents[1]


class WriterFailed(Exception):
    pass


def test_text_and_bytes_land_whole_with_the_permissions_of_a_plain_file_and_no_temporary(tmp_path):
    atomic_write_text(tmp_path / "config.yaml", "a: 1\nb: é\n")
    atomic_write_bytes(tmp_path / "blob.bin", bytes(range(256)))
    (tmp_path / "plain.txt").write_text("x")
    assert (tmp_path / "config.yaml").read_text(encoding="utf-8") == "a: 1\nb: é\n"
    assert (tmp_path / "blob.bin").read_bytes() == bytes(range(256))
    mode = (tmp_path / "plain.txt").stat().st_mode
    assert (tmp_path / "config.yaml").stat().st_mode == (tmp_path / "blob.bin").stat().st_mode == mode
    assert sorted(path.name for path in tmp_path.iterdir()) == ["blob.bin", "config.yaml", "plain.txt"]


def test_a_writer_function_that_takes_a_path_torch_save_and_safetensors(tmp_path):
    state = {"weight": torch.arange(6.0).view(2, 3), "bias": torch.ones(3)}
    atomic_write(tmp_path / "cache.pt", lambda path: torch.save(state, path))
    atomic_write(tmp_path / "model.safetensors", lambda path: save_file(state, str(path)))
    loaded = torch.load(tmp_path / "cache.pt", weights_only=True)
    for found in (loaded, load_file(tmp_path / "model.safetensors")):
        assert found.keys() == state.keys() and all(torch.equal(found[key], state[key]) for key in state)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.pt", "model.safetensors"]
    # save_file replaces the file it is given with a private one; the target still gets a plain file's mode
    (tmp_path / "plain.txt").write_text("x")
    mode = (tmp_path / "plain.txt").stat().st_mode
    assert (tmp_path / "model.safetensors").stat().st_mode == (tmp_path / "cache.pt").stat().st_mode == mode


def test_a_failing_writer_leaves_the_old_file_whole_or_none_and_no_temporary(tmp_path):
    def half_then_fail(path: Path) -> None:
        with open(path, "w") as handle:
            handle.write("half of the new")
        raise WriterFailed("disk full")

    target = tmp_path / "manifest.json"
    with pytest.raises(WriterFailed):
        atomic_write(target, half_then_fail)
    assert list(tmp_path.iterdir()) == []  # absent before, absent after

    atomic_write_text(target, "the old, complete")
    with pytest.raises(WriterFailed):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "the old, complete"
    assert list(tmp_path.iterdir()) == [target]

    # torch.save has written part of its archive when it meets an object it cannot pickle
    unpicklable = {"weight": torch.ones(1000), "lock": threading.Lock()}
    with pytest.raises(TypeError, match="pickle"):
        atomic_write(tmp_path / "cache.pt", lambda path: torch.save(unpicklable, path))
    assert list(tmp_path.iterdir()) == [target]


def test_temporaries_are_hidden_beside_their_target_and_map_back_to_it(tmp_path):
    first, second = temporary_path(tmp_path / "pets-000000.tar"), temporary_path(tmp_path / "pets-000000.tar")
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith(".") and first.stat().st_size == 0
    assert target_name(first.name) == target_name(second.name) == "pets-000000.tar"
    assert target_name("pets-000000.tar") is None and target_name(".hidden.jpg") is None


def test_models_import_the_helper_without_dali_or_kornia():
    code = ("import sys\n"
            "import models.checkpointing, models.distributed, models.knn, models.methods, models.options\n"
            "loaded = sorted(name for name in sys.modules if name.split('.')[0] in ('nvidia', 'kornia'))\n"
            "print(loaded)\n"
            "assert 'pipelines.files' in sys.modules\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"

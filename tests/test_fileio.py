"""pbp_fx.fileio: the folders a run makes, and removes when it wrote nothing."""
import os

import pytest

from pbp_fx.errors import PBError
from pbp_fx.fileio import make_folders, remove_empty


def test_make_folders_lists_what_it_made_and_remove_empty_takes_only_those(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    made = make_folders("kept/x/../y/z")  # (os.makedirs makes x too: it was left behind)
    assert made == ["kept/x/../y/z", "kept/x/../y", "kept/x"]
    assert sorted(os.listdir(tmp_path / "kept")) == ["x", "y"]
    (tmp_path / "kept" / "y" / "note").write_text("not empty")
    remove_empty(made)
    assert os.listdir(tmp_path / "kept" / "y") == ["note"]  # (z went; y holds a file: it and x stay)
    os.remove(tmp_path / "kept" / "y" / "note")
    remove_empty(made[1:])
    assert os.listdir(tmp_path / "kept") == []


def test_a_symlinked_parent_is_followed_as_the_system_follows_it(tmp_path, monkeypatch):
    """--out link/../run: the normalised path (run beside link) was made, the run wrote where the
    system resolves it (beside link's target): FileNotFoundError."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a" / "b" / "t").mkdir(parents=True)
    os.symlink(tmp_path / "a" / "b" / "t", tmp_path / "link")
    made = make_folders("link/../run/x")
    assert os.path.isdir(tmp_path / "a" / "b" / "run" / "x") and not os.path.exists(tmp_path / "run")
    remove_empty(made)
    assert os.listdir(tmp_path / "a" / "b") == ["t"]


def test_a_folder_path_the_file_system_cannot_hold_is_refused_before_work_and_leaves_nothing(tmp_path):
    """`train --out new/<300 characters>/run` failed after the run's work and left `new` behind."""
    from pbp_fx.fileio import check_output_dir, make_folders

    long = "a" * 300
    with pytest.raises(PBError, match=r"--out: the folder name a{40}\.\.\. is 300 bytes, more than the 255 this file "
                                      r"system takes; choose a shorter path"):
        check_output_dir(str(tmp_path / "new" / long / "run"))
    with pytest.raises(OSError):
        make_folders(str(tmp_path / "new" / "deeper" / long / "run"))
    assert os.listdir(tmp_path) == []
    assert make_folders(str(tmp_path / "x" / "y")) == [str(tmp_path / "x" / "y"), str(tmp_path / "x")]

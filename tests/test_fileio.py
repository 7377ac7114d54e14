"""pbp_fx.fileio: the folders a run makes, and removes when it wrote nothing."""
import os

from pbp_fx.fileio import make_folders, remove_empty


def test_make_folders_lists_what_it_made_and_remove_empty_takes_only_those(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "kept").mkdir()
    made = make_folders("kept/x/../y/z")  # (x/.. is no folder made: os.makedirs had made x and left it)
    assert made == [str(tmp_path / "kept" / "y" / "z"), str(tmp_path / "kept" / "y")]
    assert os.listdir(tmp_path / "kept") == ["y"]
    (tmp_path / "kept" / "y" / "note").write_text("not empty")
    remove_empty(made)
    assert os.listdir(tmp_path / "kept" / "y") == ["note"]  # (z went; y holds a file: it stays)
    os.remove(tmp_path / "kept" / "y" / "note")
    remove_empty(made[1:])
    assert os.listdir(tmp_path / "kept") == []

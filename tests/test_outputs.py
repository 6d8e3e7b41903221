"""No command overwrites what it did not write: output directories and files are claimed before any
work, refused where they hold the user's files or the command's own input, and replaced keeping
everything the command did not write."""

import json

import pytest

from engram_hf.cli import main
from engram_hf.utils import OUTPUT_MARKER, OutputExistsError, claim_output_dir, claim_output_file


def _fill(tmp):
    (tmp / "results.json").write_text("{}")
    (tmp / "run").mkdir()
    (tmp / "run" / "log.txt").write_text("new")


def test_a_command_writes_new_or_its_own_directories_and_keeps_the_users_files(tmp_path):
    out = tmp_path / "out"
    claim_output_dir(out, "eval", source="a").write(_fill)
    assert json.loads((out / OUTPUT_MARKER).read_text()) == {
        "command": "eval",
        "source": "a",
        "entries": ["results.json", "run"],
    }
    (out / "notes.txt").write_text("mine")
    (out / "run" / "log.txt").write_text("old")
    # A later run of the same command on the same source replaces what the first wrote, keeps the rest.
    claim_output_dir(out, "eval", source="a").write(lambda tmp: (tmp / "results.json").write_text("{}"))
    assert (out / "notes.txt").read_text() == "mine" and not (out / "run").exists()
    assert json.loads((out / OUTPUT_MARKER).read_text())["entries"] == ["results.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    claim_output_dir(empty, "demo").write(_fill)
    assert (empty / "results.json").exists()


@pytest.mark.parametrize(
    "setup,kwargs,message",
    [
        ("notes", {}, r"already holds notes\.txt: choose a new directory, or pass --overwrite"),
        ("other-command", {}, r"already holds results\.json, run \(engram-hf demo wrote them\)"),
        ("other-source", {"source": "b"}, r"holds the output of engram-hf eval for a, not for b"),
        ("file", {}, r"is a file, and engram-hf eval writes a directory"),
        ("file", {"overwrite": True}, r"is a file"),
        ("input", {"inputs": ["{out}"]}, r"is .*out, which engram-hf eval reads"),
        ("input", {"inputs": ["{out}/ckpt"], "overwrite": True}, r"holds .*ckpt, which engram-hf eval reads"),
        ("inside", {"inputs": ["{parent}"], "overwrite": True}, r"lies inside .*, which engram-hf eval reads"),
    ],
)
def test_what_a_command_did_not_write_is_refused(tmp_path, setup, kwargs, message):
    out = tmp_path / "out"
    if setup == "notes":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    elif setup in ("other-command", "other-source"):
        claim_output_dir(out, "demo" if setup == "other-command" else "eval", source="a").write(_fill)
    elif setup == "file":
        out.write_text("mine")
    elif setup == "input":
        (out / "ckpt").mkdir(parents=True)
    kwargs = {k: [v.format(out=out, parent=tmp_path) for v in vs] if k == "inputs" else vs for k, vs in kwargs.items()}
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(OutputExistsError, match=message):
        claim_output_dir(out, "eval", **{"source": "a", **kwargs})
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_overwrite_replaces_what_the_command_writes_and_keeps_the_rest(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "results.json").write_text("theirs")
    claim_output_dir(out, "eval", overwrite=True).write(_fill)
    assert (out / "notes.txt").read_text() == "mine" and (out / "results.json").read_text() == "{}"


def test_a_checkpoint_output_refuses_to_drop_the_users_weights_or_code_without_overwrite(tmp_path):
    from engram_hf.utils import keep_non_model_files

    def ckpt(tmp):
        (tmp / "model.safetensors").write_bytes(b"new")
        (tmp / "config.json").write_text("{}")

    out = tmp_path / "out"
    claim_output_dir(out, "patch apply", carry=keep_non_model_files).write(ckpt)
    (out / "analysis.py").write_text("print(1)")
    with pytest.raises(OutputExistsError, match=r"holds analysis\.py, which engram-hf patch apply did not write"):
        claim_output_dir(out, "patch apply", carry=keep_non_model_files)
    (out / "analysis.py").unlink()
    (out / "notes.txt").write_text("mine")
    claim_output_dir(out, "patch apply", carry=keep_non_model_files).write(ckpt)
    assert (out / "notes.txt").read_text() == "mine"


def test_an_existing_file_output_needs_overwrite(tmp_path):
    patch = tmp_path / "fix.safetensors"
    assert claim_output_file(patch, "edit") == patch
    patch.write_bytes(b"the only record")
    with pytest.raises(OutputExistsError, match="already exists: choose a new name, or pass --overwrite"):
        claim_output_file(patch, "edit")
    assert claim_output_file(patch, "edit", overwrite=True) == patch
    with pytest.raises(OutputExistsError, match="is a directory"):
        claim_output_file(tmp_path, "edit", overwrite=True)
    with pytest.raises(OutputExistsError, match="which engram-hf patch stack reads"):
        claim_output_file(patch, "patch stack", overwrite=True, inputs=[patch])
    assert patch.read_bytes() == b"the only record"


@pytest.mark.parametrize(
    "argv",
    [
        ["demo", "--out", "{out}", "--steps", "1"],
        ["train", "--data", "{data}", "--out", "{out}", "--steps", "1"],
        ["experiment", "iso", "--data", "{data}", "--out", "{out}", "--steps", "1", "--quick"],
    ],
    ids=["demo", "train", "experiment"],
)
def test_training_commands_refuse_a_directory_they_did_not_write(tmp_path, capsys, argv):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (tmp_path / "a.txt").write_text("some text to train on " * 200)
    argv = [a.format(out=out, data=tmp_path / "a.txt") for a in argv]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already holds notes.txt" in err[0] and "--overwrite" in err[0], err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

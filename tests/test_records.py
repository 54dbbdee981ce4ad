"""gradprobe/records/: atomic writes, saving and loading runs, output-folder checks, sinks.

The crash and fault-injection tests of the same code (kills mid-write, full disks, locks,
resume) are in ``tests/test_faults.py``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd
import pytest
from nets import make, make_input

import gradprobe
from gradprobe import records
from gradprobe.records import FRAME_COLUMNS, PATHS_COLUMNS, Run, atomic_write, check_destination, run_id_at

ROOT = Path(__file__).resolve().parent.parent

# ----------------------------------------------------------------------------- atomic writes


def test_atomic_write_replaces_the_file_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    assert atomic_write(target, lambda tmp: tmp.write_text("new")) == target
    assert target.read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_atomic_write_that_fails_mid_write_keeps_the_old_file_and_no_temporary_file(tmp_path, error):
    target = tmp_path / "a.txt"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half of the n")
        raise error

    with pytest.raises(type(error)):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_write_of_a_new_file_that_fails_creates_nothing(tmp_path):
    def fail(tmp):
        tmp.write_bytes(b"x")
        raise ValueError("cannot serialise")

    with pytest.raises(ValueError, match="cannot serialise"):
        atomic_write(tmp_path / "new.bin", fail)
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- save and load


@pytest.fixture(scope="module")
def recorded():
    """A probed run with a path-length table, string scalars and non-finite metadata."""
    net = make("res_mlp")
    x = make_input("res_mlp")
    with gradprobe.attach(net, paths=1) as probe:
        for i in range(3):
            (net(x) ** 2).sum().backward()
            probe.log(loss=0.5 * i, note="NA")
    meta = {**probe.meta(), "threshold": math.inf, "tags": ["a", "b"]}
    return probe.frame(), probe.scalars(), probe.paths_frame(), meta


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_save_and_load_round_trip_frame_scalars_paths_and_meta(tmp_path, recorded, fmt):
    frame, scalars, paths, meta = recorded
    assert len(paths) and list(paths.columns) == list(PATHS_COLUMNS)
    folder = records.save_run(tmp_path / "run", frame, scalars, meta, fmt=fmt, paths=paths)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["meta.json", f"frame.{fmt}", f"scalars.{fmt}", f"paths.{fmt}"]
    )
    run = gradprobe.load(folder)
    pd.testing.assert_frame_equal(run.frame(), frame)
    pd.testing.assert_frame_equal(run.scalars(), scalars)
    pd.testing.assert_frame_equal(run.paths(), paths)
    assert list(run.frame().columns) == list(FRAME_COLUMNS)
    assert run.frame()["block"].tolist() == frame["block"].tolist()  # "0" stays the string "0"
    assert run.scalars()["note"].tolist() == ["NA"] * 3  # not read back as a missing value
    assert run.meta["blocks"] == meta["blocks"] and run.meta["tags"] == ["a", "b"]
    assert run.meta["threshold"] == "inf"  # JSON has no infinity: stored as its repr
    assert run.meta["table_format"] == fmt and run.meta["run_id"] == run_id_at(folder)


def test_saving_a_run_again_as_csv_removes_its_parquet_tables(tmp_path, recorded):
    frame, scalars, paths, meta = recorded
    run = Run(frame, scalars, {**meta, "run_id": "abcdef012345"}, paths=paths)
    records.save_run(tmp_path / "run", run.frame(), run.scalars(), run.meta, fmt="parquet", paths=paths)
    records.save_run(tmp_path / "run", run.frame(), run.scalars(), run.meta, fmt="csv", paths=paths)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "frame.csv",
        "meta.json",
        "paths.csv",
        "scalars.csv",
    ]
    pd.testing.assert_frame_equal(gradprobe.load(tmp_path / "run").paths(), paths)


def test_save_run_rejects_an_unknown_format_before_writing(tmp_path, recorded):
    frame, scalars, _, meta = recorded
    with pytest.raises(ValueError, match="fmt must be 'parquet' or 'csv'"):
        records.save_run(tmp_path / "run", frame, scalars, meta, fmt="xlsx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- output folders


def _saved(folder, run_id="0123456789ab"):
    Run(records.empty_frame(), pd.DataFrame({"step": [0]}), {"run_id": run_id}).save(folder)
    return folder


def test_check_destination_accepts_a_new_folder_and_creates_nothing(tmp_path):
    assert check_destination(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert list(tmp_path.iterdir()) == []


def test_check_destination_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is not a folder"):
        check_destination(tmp_path / "file")
    with pytest.raises(NotADirectoryError, match="is a file, not a folder"):
        check_destination(tmp_path / "file" / "run")


def test_check_destination_refuses_another_run_unless_overwrite(tmp_path):
    folder = _saved(tmp_path / "run")
    with pytest.raises(FileExistsError, match=r"run 0123456789ab.*overwrite=True"):
        check_destination(folder, "ffffffffffff")
    with pytest.raises(FileExistsError, match="another gradprobe run"):
        check_destination(folder)  # no id: not this run
    assert check_destination(folder, "0123456789ab") == folder  # the same run may be saved again
    assert check_destination(folder, "ffffffffffff", overwrite=True) == folder


def test_check_destination_refuses_a_run_without_an_id(tmp_path):
    folder = _saved(tmp_path / "run")
    (folder / "meta.json").unlink()  # tables without metadata: still somebody's run
    assert run_id_at(folder) == ""
    with pytest.raises(FileExistsError, match=r"holds another gradprobe run: tables with no meta\.json;"):
        check_destination(folder, "0123456789ab")


def _compare_like(folder, meta):
    """A folder as gradprobe compare leaves it: the run's tables, meta.json and the report."""
    Run(
        records.empty_frame(), pd.DataFrame({"step": [0]}), {"kind": "compare", "run_id": "0123456789ab"}
    ).save(folder)
    (folder / "meta.json").write_text(json.dumps(meta))
    (folder / "index.html").write_text("<html></html>")
    (folder / "highway.png").write_bytes(b"png")
    return folder


# The committed reference report has no run_id (it predates them): kind or command must do.
EARLIER_COMPARE = [
    {"kind": "compare", "run_id": "0123456789ab"},
    {"kind": "compare", "command": "gradprobe compare --no-progress", "format_version": 1},
    {"command": "gradprobe compare --depths 20", "format_version": 1},
]


@pytest.mark.parametrize("meta", EARLIER_COMPARE)
def test_an_earlier_compare_run_may_be_replaced_by_a_compare_run(tmp_path, meta):
    folder = _compare_like(tmp_path / "run", meta)
    assert check_destination(folder, "ffffffffffff", kind="compare") == folder
    with pytest.raises(FileExistsError, match="holds another gradprobe run"):
        check_destination(folder, "ffffffffffff")  # any other writer still needs overwrite


@pytest.mark.parametrize(
    ("meta", "holds"),
    [
        (
            {"kind": "probe", "run_id": "0123456789ab", "created": "2026-01-02"},
            "a probe run (run 0123456789ab, ",
        ),
        ({"command": "python train.py"}, "a gradprobe run (no run id)"),
    ],
)
def test_a_compare_run_refuses_another_kind_of_run_naming_it(tmp_path, meta, holds):
    folder = _compare_like(tmp_path / "run", meta)
    with pytest.raises(FileExistsError) as caught:
        check_destination(folder, "ffffffffffff", kind="compare")
    assert holds in str(caught.value) and "pass overwrite=True to replace it" in str(caught.value)
    assert "(a run)" not in str(caught.value)
    assert check_destination(folder, "ffffffffffff", kind="compare", overwrite=True) == folder


def test_a_compare_run_refuses_a_folder_holding_files_gradprobe_did_not_write(tmp_path):
    folder = _compare_like(tmp_path / "run", EARLIER_COMPARE[1])
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(
        FileExistsError, match=r"files gradprobe did not write \(notes.txt\); pass overwrite=True"
    ):
        check_destination(folder, "ffffffffffff", kind="compare")
    user = tmp_path / "mine"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")  # no run at all: still somebody's folder
    with pytest.raises(FileExistsError, match=r"thesis.tex"):
        check_destination(user, kind="compare")
    with pytest.raises(FileExistsError, match=r"holds no gradprobe run or report \(thesis.tex\)"):
        check_destination(user)  # a report or a save would write over the user's own files
    assert check_destination(user, overwrite=True) == user


def test_check_destination_words_its_message_for_the_command_line(tmp_path):
    folder = _saved(tmp_path / "run")
    with pytest.raises(FileExistsError) as caught:
        check_destination(folder, "ffffffffffff", name=f"--out {folder}", force="--force")
    message = str(caught.value)
    assert message.startswith(f"--out {folder} holds another gradprobe run")
    assert "pass --force to replace it" in message and "overwrite" not in message


def test_replacing_another_run_keeps_the_files_gradprobe_did_not_write(tmp_path):
    """Regression: overwrite=True swapped a whole new folder in and deleted the old one, the
    files of the user in it included."""
    folder = tmp_path / "run"
    old = Run(records.empty_frame(), pd.DataFrame({"step": [0, 1]}), {"run_id": "0123456789ab"})
    records.save_run(folder, old.frame(), old.scalars(), old.meta, paths=records.paths_table([]))
    assert (folder / "paths.parquet").is_file()
    (folder / "notes.txt").write_text("mine")
    new = Run(records.empty_frame(), pd.DataFrame({"step": [5]}), {"run_id": "ffffffffffff"})
    new.save(folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in folder.iterdir()) == [
        "frame.parquet",
        "meta.json",
        "notes.txt",
        "scalars.parquet",
    ]
    back = gradprobe.load(folder)  # the replaced run's path lengths went with it
    assert back.scalars()["step"].tolist() == [5] and back.meta["run_id"] == "ffffffffffff"


def test_foreign_files_are_the_names_gradprobe_does_not_write(tmp_path):
    for name in ("meta.json", "frame.parquet", "scalars.csv", "paths.parquet", "index.html", "gain.png",
                 ".gradprobe.lock", ".meta.json.123-abcdef.tmp",
                 "frame-0123456789ab-000001-r3.parquet", "notes.txt", "frame.parquet.bak"):  # fmt: skip
        (tmp_path / name).write_text("x")
    (tmp_path / "sub").mkdir()
    assert records.foreign_files(tmp_path) == ["frame.parquet.bak", "notes.txt", "sub"]


def test_the_reference_report_is_of_the_current_format_version():
    """reports/compare is regenerated whenever the run folder's layout changes (meta.json's
    format_version); an older one is a stale reference."""
    meta = json.loads((ROOT / "reports" / "compare" / "meta.json").read_text())
    assert meta.get("format_version") == records.FORMAT_VERSION, (
        f"reports/compare was written by format version {meta.get('format_version')}, the package writes "
        f"{records.FORMAT_VERSION}: regenerate it with `gradprobe compare`"
    )
    assert (
        meta.get("table_format") == "parquet" and (ROOT / "reports" / "compare" / "frame.parquet").is_file()
    )


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes anywhere")
def test_check_destination_refuses_a_folder_it_cannot_write(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(PermissionError, match=r"cannot be written.*writable folder"):
            check_destination(locked / "run")
    finally:
        locked.chmod(0o700)


def test_run_id_at_tells_an_empty_folder_from_a_run(tmp_path):
    assert run_id_at(tmp_path / "missing") is None
    assert run_id_at(tmp_path) is None
    assert run_id_at(_saved(tmp_path / "run", "aaaaaaaaaaaa")) == "aaaaaaaaaaaa"


# ----------------------------------------------------------------------------- sinks


def test_sink_streams_chunks_and_load_reads_the_whole_run(tmp_path):
    net = make("res_mlp")
    x = make_input("res_mlp")
    with gradprobe.attach(net, sink=tmp_path / "run", sink_options={"chunk_rows": 8}) as probe:
        for i in range(7):
            (net(x) ** 2).sum().backward()
            probe.log(loss=float(i))
        in_memory = probe._out.store.nbytes
    chunks = sorted((tmp_path / "run").glob("frame-*"))
    assert len(chunks) >= 3
    assert in_memory == 0  # nothing kept in memory with a sink
    run = gradprobe.load(tmp_path / "run")
    f = run.frame()
    assert len(f) == 7 * 4 and f["step"].tolist() == sorted(f["step"].tolist())
    pd.testing.assert_frame_equal(f, probe.frame())
    assert run.scalars()["loss"].tolist() == [float(i) for i in range(7)]
    assert run.meta["blocks"] == ["0", "1", "2", "3"]


def test_interrupted_run_keeps_every_chunk_written_before_the_interruption(tmp_path):
    net = make("res_mlp")
    x = make_input("res_mlp")
    with (
        pytest.raises(KeyboardInterrupt),
        gradprobe.attach(net, sink=tmp_path / "run", sink_options={"chunk_rows": 4}),
    ):
        for i in range(5):
            (net(x) ** 2).sum().backward()
            if i == 3:
                raise KeyboardInterrupt
    f = gradprobe.load(tmp_path / "run").frame()
    assert sorted(f["step"].unique()) == [0, 1, 2, 3]
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_sink_that_cannot_be_written_fails_at_attach_time(tmp_path, no_leaks):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    net = no_leaks(make("res_mlp"))
    with pytest.raises(OSError, match="cannot be written"):
        gradprobe.attach(net, sink=blocker / "run")

"""nirvana.output: where the tool may write, and publishing a finished folder there."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from nirvana import output
from nirvana.output import MARKER_FILE, OWNER_FILE, OutputExistsError, check_target, scratch, staged

# Loads nirvana/output.py on its own (stdlib only), so a child process starts in milliseconds.
LOAD = (
    "import importlib.util, os, sys; "
    "spec = importlib.util.spec_from_file_location('nirvana_output', sys.argv[1]); "
    "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
)
# Enters scratch() for the folder argv[2], says where, and dies without cleaning up, as under SIGKILL.
DIE_INSIDE = LOAD + "cm = m.scratch(sys.argv[2]); tmp = cm.__enter__(); print(tmp, flush=True); os._exit(0)"


def listing(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def ours(folder: Path) -> Path:
    """A folder as nirvana publishes it (marker included), with one file of content."""
    with staged(folder) as tmp:
        (tmp / "plan.json").write_text("{}")
    return folder


@pytest.fixture
def source(tmp_path) -> Path:
    folder = tmp_path / "models" / "dense"
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"weights")
    return folder


def one_line(err) -> str:
    message = str(err.value if hasattr(err, "value") else err)
    assert "\n" not in message and "Errno" not in message, message
    return message


# --- check_target: sources ---------------------------------------------------------------------

SOURCE_CASES = {
    "is-source": (lambda t, s: s, "would replace the model's source folder"),
    "contains-source": (lambda t, s: s.parent, "would replace the model's source folder"),
    "contains-source-twice-up": (lambda t, s: t, "would replace the model's source folder"),
    "inside-source": (lambda t, s: s / "sub", "lies inside the model's source folder"),
    "deep-inside-source": (lambda t, s: s / "a" / "b", "lies inside the model's source folder"),
    "dotted-spelling": (lambda t, s: s.parent / "." / ".." / "models" / "dense", "would replace"),
}


@pytest.mark.parametrize("case", list(SOURCE_CASES), ids=list(SOURCE_CASES))
@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_an_output_that_touches_the_source_is_refused(case, overwrite, tmp_path, source):
    make, message = SOURCE_CASES[case]
    with pytest.raises(ValueError, match=message) as err:
        check_target(make(tmp_path, source), sources=[source], overwrite=overwrite)
    assert str(source) in one_line(err) and one_line(err).startswith("out: ")


@pytest.mark.parametrize("link_to", ["parent", "source"], ids=["linked-parent", "linked-folder"])
def test_symbolic_links_are_resolved_before_comparing(link_to, tmp_path, source):
    # The reproduction of the issue: ln -s models linkdir; --out linkdir/dense --overwrite.
    if link_to == "parent":
        (tmp_path / "linkdir").symlink_to(source.parent)
        out = tmp_path / "linkdir" / "dense"
    else:
        (tmp_path / "link").symlink_to(source)
        out = tmp_path / "link"
    with pytest.raises(ValueError, match="would replace the model's source folder") as err:
        check_target(out, sources=[source], overwrite=True)
    assert "really" in one_line(err) and str(out) in one_line(err)
    # The same from the source's side: the source given through the link, the output by its real path.
    with pytest.raises(ValueError, match="would replace"):
        check_target(source, sources=[out], overwrite=True)


def test_tilde_is_expanded(tmp_path, source, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="would replace the model's source folder"):
        check_target("~/models/dense", sources=[source], overwrite=True)
    assert check_target("~/new") == tmp_path / "new"


def test_a_source_file_is_protected_too(tmp_path):
    gguf = tmp_path / "models" / "m.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="would replace the model's source file"):
        check_target(gguf.parent, sources=[gguf], overwrite=True)
    with pytest.raises(ValueError, match="would replace the model's source file"):
        check_target(gguf, sources=[gguf], overwrite=True)


def test_a_sibling_with_a_common_prefix_is_fine(tmp_path, source):
    # models/dense-pruned is not inside models/dense, though the strings share a prefix.
    assert check_target(source.parent / "dense-pruned", sources=[source]) == source.parent / "dense-pruned"
    assert check_target(tmp_path / "out", sources=[tmp_path / "no-such-source"]) == tmp_path / "out"


# --- check_target: an existing output ------------------------------------------------------------


def test_an_existing_output_needs_overwrite(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="already exists; pass --overwrite") as err:
        check_target(out)
    assert isinstance(err.value, ValueError) and isinstance(err.value, FileExistsError)
    assert check_target(out, overwrite=True) == out


@pytest.mark.parametrize(
    "contents",
    [{}, {"notes.txt": "mine"}, {"plan.json": "{}"}, {MARKER_FILE: "not json"}, {MARKER_FILE: '{"written_by": "x"}'}],
    ids=["empty", "user-files", "plan-only", "garbage-marker", "other-marker"],
)
def test_overwrite_refuses_a_folder_nirvana_did_not_write(contents, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, text in contents.items():
        (out / name).write_text(text)
    before = {p.name: p.read_text() for p in out.iterdir()}
    with pytest.raises(ValueError, match="was not written by nirvana; refusing to replace it") as err:
        check_target(out, overwrite=True)
    one_line(err)
    with pytest.raises(ValueError, match="was not written by nirvana"):
        with staged(out, overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    assert {p.name: p.read_text() for p in out.iterdir()} == before and listing(tmp_path) == {"out"}


def test_a_linked_marker_does_not_count(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "real-marker").write_text(json.dumps(output.MARKER))
    (out / MARKER_FILE).symlink_to(tmp_path / "real-marker")
    with pytest.raises(ValueError, match="was not written by nirvana"):
        check_target(out, overwrite=True)


def test_folders_of_older_versions_are_recognised_by_plan_and_report(tmp_path):
    out = tmp_path / "old"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    (out / "report.json").write_text("{}")
    assert check_target(out, overwrite=True) == out


def test_an_output_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        check_target(tmp_path / "f", overwrite=True)


# --- check_target: the parent ------------------------------------------------------------------


def test_a_parent_that_is_a_file_is_refused_in_plain_words(tmp_path):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f" / "out", tmp_path / "f" / "deeper" / "out"):
        with pytest.raises(ValueError, match="is a file, not a folder") as err:
            check_target(out)
        assert repr(str(tmp_path / "f")) in one_line(err)
        with pytest.raises(ValueError, match="is a file, not a folder"):
            with scratch(out):
                pass
    assert (tmp_path / "f").read_text() == "x"


@pytest.mark.parametrize("where", ["/proc/nirvana-out", "/proc/self/out", "/sys/out", "/sys/fs/x/out", "/dev/out"])
def test_kernel_folders_are_refused(where):
    if not Path("/" + where.split("/")[1]).is_dir():
        pytest.skip(f"no {where.split('/')[1]} here")
    with pytest.raises(ValueError, match="system folder of the kernel") as err:
        check_target(where)
    one_line(err)


@pytest.fixture
def locked_folder():
    """A folder this test's user can enter but not write in, and a way to run code as such a user."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o755)
        shutil.copy(output.__file__, base / "output_copy.py")
        (base / "output_copy.py").chmod(0o644)
        if os.geteuid() != 0:
            locked.chmod(0o555)
        yield base, locked
    finally:
        locked.chmod(0o755)
        shutil.rmtree(base)


def test_a_parent_without_write_permission_is_refused_in_plain_words(locked_folder):
    base, locked = locked_folder
    # root may write anywhere, so the check then runs in a child process as the user nobody.
    code = (
        LOAD + "\nfor out in (sys.argv[2] + '/out', sys.argv[2] + '/new/out'):\n"
        "    try:\n        m.check_target(out)\n        print('accepted')\n"
        "    except ValueError as e:\n        print(e)\n"
        "try:\n    m.scratch(sys.argv[2] + '/out').__enter__()\n    print('accepted')\n"
        "except ValueError as e:\n    print(e)\n"
    )
    user = {"user": 65534, "group": 65534} if os.geteuid() == 0 else {}
    for python in (sys.executable, "/usr/bin/python3"):  # the first that user may run
        argv = [python, "-c", code, str(base / "output_copy.py"), str(locked)]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=base, **user)
            break
        except (PermissionError, FileNotFoundError):
            continue
    else:
        pytest.skip("no Python interpreter that the user nobody may run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 3 and all(line == f"out: this user may not write in {str(locked)!r}" for line in lines), lines
    assert listing(locked) == set()


# --- staged: publishing ----------------------------------------------------------------------


def test_staged_publishes_a_marked_folder_and_leaves_nothing_else(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with staged(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.nirvana-tmp-")
        owner = json.loads((tmp / OWNER_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        (tmp / "weights").write_text("w")
        assert not out.exists()
    assert listing(out) == {"weights", MARKER_FILE} and output.is_ours(out)
    assert listing(out.parent) == {"out"}


@pytest.mark.parametrize("existing", [False, True], ids=["new", "overwrite"])
def test_a_failure_inside_leaves_the_output_as_it_was(existing, tmp_path):
    out = tmp_path / "out"
    if existing:
        ours(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()} if existing else None
    with pytest.raises(KeyboardInterrupt):
        with staged(out, overwrite=existing) as tmp:
            (tmp / "half").write_text("half")
            raise KeyboardInterrupt
    assert listing(tmp_path) == ({"out"} if existing else set())
    if existing:
        assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def no_renameat2(*args) -> int:
    return errno.ENOSYS


MODES = {"renameat2": None, "fallback": no_renameat2}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
def test_overwrite_swaps_in_the_new_folder_and_removes_the_old(mode, tmp_path, monkeypatch):
    if MODES[mode]:
        monkeypatch.setattr(output, "_renameat2", MODES[mode])
    out = ours(tmp_path / "out")
    (out / "old.txt").write_text("old")
    with staged(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert listing(out) == {"new.txt", MARKER_FILE} and listing(tmp_path) == {"out"}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("existing", [False, True], ids=["absent", "overwrite"])
def test_a_folder_that_appears_while_writing_wins_and_is_left_alone(mode, existing, tmp_path, monkeypatch):
    if MODES[mode]:
        monkeypatch.setattr(output, "_renameat2", MODES[mode])
    out = tmp_path / "out"
    if existing:
        ours(out)
    theirs = tmp_path / "theirs"
    theirs.mkdir()  # made while out still exists, so it cannot reuse out's inode
    (theirs / "theirs").write_text("theirs")
    with pytest.raises(OutputExistsError, match="another writer while this run was writing") as err:
        with staged(out, overwrite=existing) as tmp:
            (tmp / "mine").write_text("mine")
            if existing:  # another writer replaced it meanwhile
                shutil.rmtree(out)
            theirs.rename(out)
    one_line(err)
    assert listing(out) == {"theirs"} and listing(tmp_path) == {"out"}


def test_an_output_whose_marker_goes_while_writing_is_not_replaced(tmp_path):
    out = ours(tmp_path / "out")
    with pytest.raises(ValueError, match="was not written by nirvana"):
        with staged(out, overwrite=True) as tmp:
            (tmp / "mine").write_text("mine")
            (out / MARKER_FILE).unlink()
            (out / "user.txt").write_text("mine now")
    assert listing(out) == {"plan.json", "user.txt"} and listing(tmp_path) == {"out"}


@pytest.mark.parametrize("mode", ["renameat2", "fallback"])
def test_a_folder_that_appears_just_before_the_rename_wins(mode, tmp_path, monkeypatch):
    # Past the re-check: only the no-replace rename itself (or the fallback's last look) stands guard.
    real = output._renameat2
    out = tmp_path / "out"

    def appear_then_rename(src, dst, flags):
        if not dst.exists():
            dst.mkdir()
            (dst / "theirs").write_text("theirs")
        return real(src, dst, flags) if mode == "renameat2" else errno.ENOSYS

    monkeypatch.setattr(output, "_renameat2", appear_then_rename)
    with pytest.raises(OutputExistsError, match="another writer") as err:
        with staged(out) as tmp:
            (tmp / "mine").write_text("mine")
    one_line(err)
    assert listing(out) == {"theirs"} and listing(tmp_path) == {"out"}


@pytest.mark.parametrize("mode", list(MODES), ids=list(MODES))
@pytest.mark.parametrize("existing", [False, True], ids=["absent", "overwrite"])
def test_two_concurrent_publishers_one_wins(mode, existing, tmp_path, monkeypatch):
    if MODES[mode]:
        monkeypatch.setattr(output, "_renameat2", MODES[mode])
    out = tmp_path / "out"
    if existing:
        ours(out)
    barrier = threading.Barrier(2)
    results: dict[int, object] = {}

    def publish(i: int) -> None:
        try:
            with staged(out, overwrite=existing) as tmp:
                (tmp / "who").write_text(str(i))
                barrier.wait(timeout=30)  # both are written and about to publish
            results[i] = "won"
        except Exception as e:  # noqa: BLE001  (the loser's error is what the test looks at)
            results[i] = e

    threads = [threading.Thread(target=publish, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    winners = [i for i, r in results.items() if r == "won"]
    assert len(winners) == 1, results
    loser = results[1 - winners[0]]
    assert isinstance(loser, OutputExistsError), loser
    one_line(loser)
    assert (out / "who").read_text() == str(winners[0])
    assert listing(tmp_path) == {"out"}, "a temporary folder was left"


def test_scratch_is_beside_the_output_and_removed_after(tmp_path):
    out = tmp_path / "out"
    with scratch(out) as tmp:
        assert tmp.parent == tmp_path and (tmp / OWNER_FILE).is_file()
        (tmp / "scores").write_text("s")
    assert listing(tmp_path) == set()


# --- Stale temporary folders -----------------------------------------------------------------


def die_inside(out: Path, reap: bool = True) -> tuple[Path, subprocess.Popen]:
    """The temporary folder a process left beside ``out`` when it died mid-write."""
    child = subprocess.Popen(
        [sys.executable, "-c", DIE_INSIDE, output.__file__, str(out)], stdout=subprocess.PIPE, text=True
    )
    tmp = Path(child.stdout.readline().strip())
    if reap:
        child.wait(timeout=30)
    return tmp, child


def test_a_temporary_folder_of_a_dead_process_is_removed_by_the_next_run(tmp_path):
    out = tmp_path / "out"
    tmp, _ = die_inside(out)
    assert tmp.is_dir() and tmp.name.startswith(".out.nirvana-tmp-")
    (tmp / "half.safetensors").write_bytes(b"half")
    with staged(out) as new:
        (new / "x").write_text("x")
    assert listing(tmp_path) == {"out"}


def test_a_killed_but_unreaped_process_counts_as_gone(tmp_path):
    out = tmp_path / "out"
    tmp, child = die_inside(out, reap=False)
    try:
        for _ in range(500):  # until it has exited (a zombie: its parent has not waited for it yet)
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.01)
        assert output.remove_stale(out) == [tmp]
    finally:
        child.wait(timeout=30)


def test_temporary_folders_that_may_still_be_in_use_are_kept(tmp_path):
    out = tmp_path / "out"
    with scratch(out) as alive:  # this very process is its owner, and still running
        record = output.owner_record()
        kept = {alive}
        for name, owner in {
            "other-host": {**record, "pid": 2**22 + 7, "host": "elsewhere"},
            "no-pid": {k: v for k, v in record.items() if k != "pid"},
            "not-ours": {**record, "written_by": "someone", "pid": 2**22 + 7},
        }.items():
            folder = tmp_path / f".out{output.TEMP_INFIX}{name}"
            folder.mkdir()
            (folder / OWNER_FILE).write_text(json.dumps(owner))
            kept.add(folder)
        no_owner = tmp_path / f".out{output.TEMP_INFIX}no-owner"
        no_owner.mkdir()
        other_output = tmp_path / f".other{output.TEMP_INFIX}x"
        other_output.mkdir()
        (other_output / OWNER_FILE).write_text(json.dumps({**record, "pid": 2**22 + 7}))
        kept |= {no_owner, other_output}
        # A link named like a temporary folder, to a folder a dead process owned: not followed.
        dead_elsewhere, _ = die_inside(tmp_path / "elsewhere" / "x")
        (tmp_path / f".out{output.TEMP_INFIX}link").symlink_to(dead_elsewhere)
        assert output.remove_stale(out) == []
        assert all(p.exists() for p in kept) and dead_elsewhere.is_dir()


def test_a_reused_pid_does_not_keep_a_stale_folder(tmp_path):
    # The pid now belongs to a process that started after the owner: the owner is gone.
    if output.owner_record()["start_ticks"] is None:
        pytest.skip("no /proc: process start times are unknown")
    record = {**output.owner_record(), "start_ticks": output.owner_record()["start_ticks"] - 1}
    assert output.owner_is_gone(record)
    assert not output.owner_is_gone(output.owner_record())
    assert output.owner_is_gone({**output.owner_record(), "boot_id": "an-earlier-boot"})


def test_a_source_reached_through_a_bind_mount_is_recognised(tmp_path, source):
    # No link to resolve: only the folders' identity tells that mnt/dense is models/dense. The mount
    # lives in a private mount namespace of the child, so nothing is left mounted after it.
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    code = (
        LOAD + "\nfor out in (sys.argv[2] + '/dense', sys.argv[2] + '/dense/sub', sys.argv[2]):\n"
        "    try:\n        m.check_target(out, sources=[sys.argv[3]], overwrite=True)\n        print('accepted')\n"
        "    except ValueError as e:\n        print(str(e).split(' (really')[0].split(\"' \", 1)[1])\n"
    )
    script = f'mount --bind "$1" "$2" && exec "{sys.executable}" -c "$3" "$4" "$2" "$5"'
    argv = ["unshare", "-m", "sh", "-c", script, "sh", source.parent, mnt, code, output.__file__, source]
    try:
        done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("no unshare here")
    if done.returncode != 0 and ("mount" in done.stderr or "unshare" in done.stderr):
        pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"would replace the model's source folder {str(source)!r}",
        f"lies inside the model's source folder {str(source)!r}, which is only read",
        f"would replace the model's source folder {str(source)!r}",
    ]
    assert not any(mnt.iterdir()), "the bind mount leaked out of its namespace"

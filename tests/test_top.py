"""`fusecache top` on a real mount: in a real terminal (tmux), read off the screen, and as one plain frame."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

from fusecache.top import human
from tests.harness.waiting import WaitTimeout, wait_for
from tests.mounting import run_fusecache, stats

pytestmark = pytest.mark.mount

IMAGE_SIZE = 8 << 20
WAIT = 30.0  # the longest any screen condition may take to appear; a bound, not a measurement


class Terminal:
    """A tmux session on a private server running one command; its screen is read with capture-pane."""

    def __init__(self, tmp: str, command: list[str], width: int = 120, height: int = 50) -> None:
        self.socket = os.path.join(tmp, "tmux.sock")
        self.status = os.path.join(tmp, "top.status")
        # the shell records the exit status where the test can read it, then keeps the pane open
        shell = f"{shlex.join(command)}; echo $? > {shlex.quote(self.status)}; sleep 600"
        self.tmux("new-session", "-d", "-s", "top", "-x", str(width), "-y", str(height), shell)

    def tmux(self, *args: str) -> str:
        proc = subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"tmux {' '.join(args)}: {proc.stderr.strip()}"
        return proc.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def wait_for(self, what: str, ok: Callable[[str], bool]) -> str:
        """The screen, once `ok` says it shows `what`; giving up, the failure shows the last screen."""
        screen = ""

        def shows() -> bool:
            nonlocal screen
            screen = self.screen()
            return ok(screen)

        try:
            wait_for(shows, what, WAIT, interval=0.2)
        except WaitTimeout:
            size = self.tmux("display-message", "-p", "-t", "top", "#{window_width}x#{window_height}").strip()
            raise AssertionError(f"the screen ({size}) never showed {what}:\n{screen}") from None
        return screen

    def exit_status(self) -> int:
        try:
            return int(wait_for(lambda: _read(self.status), "fusecache top to exit", WAIT))
        except WaitTimeout:
            raise AssertionError(f"fusecache top did not exit:\n{self.screen()}") from None

    def tty_settings(self) -> str:
        tty = self.tmux("display-message", "-p", "-t", "top", "#{pane_tty}").strip()
        return subprocess.run(["stty", "-a", "-F", tty], capture_output=True, text=True, check=True).stdout

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True, timeout=30)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return ""


@pytest.fixture
def terminal(tmp_path) -> Iterator[Callable[..., Terminal]]:
    made: list[Terminal] = []

    def start(*top_args: str, width: int = 120) -> Terminal:
        t = Terminal(str(tmp_path), [sys.executable, "-m", "fusecache", "top", *top_args], width=width)
        made.append(t)
        return t

    try:
        yield start
    finally:
        for t in made:
            t.close()


@pytest.fixture
def mount(mounter, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "vm1.img").write_bytes(os.urandom(IMAGE_SIZE))
    return mounter.mount(str(images), "--cache-dir", str(tmp_path / "cache"), "--cache-size", "64M", "--admit", "inclusive")


class Reader:
    """Reads an image through the mount over and over in a thread, reopening it so the page cache does not absorb it."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                with open(self.path, "rb") as f:
                    while not self.stop.is_set() and f.read(1 << 20):
                        pass
        except OSError as exc:
            self.error = exc

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()
        assert self.error is None, self.error


def image_row(screen: str, image: str) -> list[str]:
    """The cells of `image`'s row: name, reads/s, MB/s, hit%, local, peer, miss, admitted."""
    for line in screen.splitlines():
        cells = line.strip("│ ").split()
        if cells and cells[0] == image:
            return cells
    raise AssertionError(f"no row for {image} on the screen:\n{screen}")


def test_live_screen_agrees_with_stats(mount, terminal):
    reader = Reader(os.path.join(mount.mountpoint, "vm1.img"))
    try:
        term = terminal(mount.mountpoint)
        # under load: a rate above zero is on screen
        screen = term.wait_for("reads/s above zero", lambda s: "vm1.img" in s and image_row(s, "vm1.img")[1] not in ("0", "—"))
        assert mount.mountpoint in screen
    finally:
        reader.close()
    # once the load stops, two refreshes showing no reads mean the figures on screen are final
    term.wait_for("reads/s back to zero", lambda s: "vm1.img" in s and image_row(s, "vm1.img")[1] == "0")
    screen = term.screen()
    st = stats(mount.mountpoint)
    c = st.images["vm1.img"]
    total = c.hit_bytes + c.peer_bytes + c.backing_bytes
    row = image_row(screen, "vm1.img")
    assert row[3] == f"{100 * (c.hit_bytes + c.peer_bytes) / total:.1f}"
    assert row[-1] == str(c.admitted_chunks)
    assert f"/ {human(st.store.capacity)}" in screen
    assert f"{human(st.store.bytes_stored)} / " in screen
    assert f"local {100 * c.hit_bytes / total:.1f}%" in screen
    assert f"miss {100 * c.backing_bytes / total:.1f}%" in screen

    term.tmux("send-keys", "-t", "top", "q")
    assert term.exit_status() == 0
    settings = term.tty_settings()
    assert re.search(r"(?<!-)icanon", settings) and re.search(r"(?<!-)echo\b", settings), "the terminal was not restored"


def test_redraws_on_resize(mount, terminal):
    term = terminal(mount.mountpoint, width=120)
    border = f"╭─ {mount.mountpoint} "
    term.wait_for("a 120-column panel", lambda s: any(line.startswith(border) and len(line) == 120 for line in s.splitlines()))
    term.tmux("resize-window", "-t", "top", "-x", "84", "-y", "40")
    screen = term.wait_for("an 84-column panel", lambda s: any(line.startswith(border) and len(line) == 84 for line in s.splitlines()))
    assert all(len(line) <= 84 for line in screen.splitlines())
    assert "vm1.img" in screen or "hits" in screen
    term.tmux("send-keys", "-t", "top", "C-c")
    assert term.exit_status() == 0


def test_a_mount_that_goes_away_is_shown_gone(mounter, mount, terminal):
    term = terminal(mount.mountpoint)
    term.wait_for("the mount", lambda s: "cache " in s)
    mounter.unmount(mount)
    screen = term.wait_for("the mount marked gone", lambda s: "gone: not mounted any more" in s)
    assert mount.mountpoint in screen
    assert not os.path.exists(term.status), "top exited when the mount went away"
    term.tmux("send-keys", "-t", "top", "q")
    assert term.exit_status() == 0


def test_once_prints_one_plain_frame(mount):
    with open(os.path.join(mount.mountpoint, "vm1.img"), "rb") as f:
        while f.read(1 << 20):
            pass
    proc = run_fusecache("top", mount.mountpoint, "--once", "--interval", "0")
    assert proc.returncode == 0, proc.stderr
    st = stats(mount.mountpoint)
    out = proc.stdout
    assert "\x1b" not in out, "--once must be plain text"
    assert all(len(line) <= 100 for line in out.splitlines())
    assert mount.mountpoint in out and "vm1.img" in out
    assert f"/ {human(st.store.capacity)}" in out
    assert image_row(out, "vm1.img")[-1] == str(st.images["vm1.img"].admitted_chunks)
    assert st.attrs.getattrs > 0
    assert re.search(r"getattr \d+ \(stat \d+\)", out), out
    text = run_fusecache("stats", mount.mountpoint).stdout
    got = re.search(r"attributes: (\d+) GETATTRs of files, (\d+) answered by a backing stat; (\d+) O_DIRECT opens", text)
    assert got is not None, text
    later = stats(mount.mountpoint).attrs
    assert st.attrs.getattrs <= int(got[1]) <= later.getattrs and int(got[2]) <= later.backing_stats


def test_without_a_terminal_top_prints_one_frame_and_exits(mount):
    # stdout is a pipe here: no --once, and still one frame and an exit
    proc = run_fusecache("top", mount.mountpoint, "--interval", "0.2", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert mount.mountpoint in proc.stdout
    assert "reads " in proc.stdout


def test_with_no_mount_named_top_shows_every_fusecache_mount(mount):
    # other fusecache mounts on this host may be in the frame too, in whatever state: only ours is checked
    proc = run_fusecache("top", "--once", "--interval", "0", timeout=60)
    assert f"╭─ {mount.mountpoint} " in proc.stdout, proc.stderr


def test_a_named_mount_that_does_not_exist(tmp_path):
    proc = run_fusecache("top", str(tmp_path / "nowhere"), "--once")
    assert proc.returncode != 0
    assert proc.stdout == ""
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "nowhere is not mounted" in proc.stderr
    assert "Traceback" not in proc.stderr

"""A tiny real guest: a Debian cloud kernel, a busybox initramfs, QEMU TCG (for the tests and `make demo`).

Owns: building the guest (kernel + initramfs, cached under `~/.cache/fusecache/guest/`),
building ext4 disk images, launching and stopping QEMU by PID, and the
command channel that runs shell commands inside the guest.

Nothing is committed: the kernel comes from `apt-get download
linux-image-cloud-amd64` and the versioned package it depends on, unpacked
with `dpkg -x` (never installed). The build is cached under
`~/.cache/fusecache/guest/<package>_<version>/`, so only the first
run downloads anything; the initramfs is rebuilt when its /init (or its
`preads` helper, tests/harness/preads.c, built static with gcc) changes.

The guest:

- `/init` mounts proc, sys and dev, loads the virtio modules (they are
  modules in the cloud kernel; ext4 and the 8250 serial port are built in),
  mounts /dev/vda on /mnt when the kernel command line says `fc.mount=ro` or
  `fc.mount=rw`, then serves the command channel on /dev/ttyS1.
- `/bin/preads FILE BLOCK N...` reads blocks at random offsets in one process,
  as one `dd bs=BLOCK skip=N count=1` each would (a process start is ~10 ms
  under TCG).
- The console (ttyS0, kernel messages) goes to a log file on the host.
- Command channel protocol (ttyS1 in raw mode, one line per command):
  the host sends `NONCE COMMAND\\n`; the guest answers `@@fc-start NONCE\\n`,
  the command's stdout and stderr, then `\\n@@fc-done NONCE RC\\n`. The nonce
  keeps a late answer to an earlier command (or a command printing a marker)
  from being taken for the current one.

Use:

    from tests.harness.tinyguest import Guest, build_guest, make_disk
    make_disk(tmp / "disk.img", {"f": 256 << 20})
    with Guest(tmp / "vm", build_guest()) as g:
        g.start(tmp / "disk.img")                # any path: a fusecache mount too
        rc, out = g.run("md5sum /mnt/f")

QEMU opens the disk with `cache=none` (O_DIRECT), so every guest read reaches
the file. `Guest.qmp()` is a private synchronous QMP connection for the
test's own commands (balloon, quit); `Guest.qmp_sock` is a second, free QMP
socket for the code under test. `CommandChannel(workdir / "cmd.sock")` talks
to a guest started some other way (tests/guest.py runs one under libvirtd).
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import json
import lzma
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusecache" / "guest"
META_PACKAGE = "linux-image-cloud-amd64"
# Load order matters: each module needs the ones before it.
MODULES = ["virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk", "virtio_balloon"]
BUSYBOX = "/bin/busybox"
PREADS_C = Path(__file__).with_name("preads.c")  # built static into the initramfs as /bin/preads

INIT_SCRIPT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mkdir -p /proc /sys /dev /mnt /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in MODULES; do
    insmod /lib/modules/$m.ko || echo "fc-guest: insmod $m failed"
done
mnt=$(sed -n 's/.*fc\.mount=\([a-z]*\).*/\1/p' /proc/cmdline)
if [ -n "$mnt" ] && [ "$mnt" != none ]; then
    i=0
    while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do usleep 100000; i=$((i + 1)); done
    mount -t ext4 -o "$mnt" /dev/vda /mnt || echo "fc-guest: mount /dev/vda failed"
fi
echo "fc-guest: ready"
stty -F /dev/ttyS1 raw -echo
exec 3<>/dev/ttyS1
while IFS= read -r line <&3; do
    nonce=${line%% *}
    cmd=${line#* }
    echo "@@fc-start $nonce" >&3
    sh -c "$cmd" </dev/null >&3 2>&3
    printf '\n@@fc-done %s %d\n' "$nonce" $? >&3
done
poweroff -f
""".replace("MODULES", " ".join(MODULES))


class GuestUnavailable(RuntimeError):
    """The guest cannot be built here (no QEMU, no busybox-static, no kernel package)."""


@dataclass
class GuestBuild:
    """A built guest: the kernel and the initramfs to boot it with."""

    kernel: Path
    initramfs: Path
    version: str


def _run(cmd: list[str], cwd: Path | None = None) -> str:
    return subprocess.run(cmd, cwd=cwd, check=True, capture_output=True, text=True).stdout


def _candidate_version(package: str) -> str | None:
    """The version apt would download, from the local package lists (no network)."""
    for line in _run(["apt-cache", "policy", package]).splitlines():
        key, _, value = line.strip().partition(":")
        if key == "Candidate" and value.strip() not in ("", "(none)"):
            return value.strip()
    return None


def _unpack_kernel(dest: Path) -> None:
    """Download the meta package, then the kernel package it names, and unpack the latter into dest."""
    with tempfile.TemporaryDirectory(prefix="fc-kernel-") as tmp:
        work = Path(tmp)
        _run(["apt-get", "download", "-q", META_PACKAGE], cwd=work)
        meta = next(work.glob(f"{META_PACKAGE}_*.deb"))
        depends = _run(["dpkg-deb", "-f", str(meta), "Depends"])
        kernel_pkg = next(d.split()[0] for d in depends.split(",") if d.strip().startswith("linux-image-"))
        _run(["apt-get", "download", "-q", kernel_pkg], cwd=work)
        deb = next(work.glob(f"{kernel_pkg}_*.deb"))
        root = work / "root"
        _run(["dpkg", "-x", str(deb), str(root)])
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
        moddirs = sorted((root / "lib" / "modules").glob("*"))
        if not kernels or not moddirs:
            raise RuntimeError(f"{deb.name} holds no kernel or no modules")
        staging = dest.with_name(dest.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        (staging / "modules").mkdir(parents=True)
        shutil.copy(kernels[-1], staging / "vmlinuz")
        for name in MODULES:
            _copy_module(moddirs[-1], name, staging / "modules" / f"{name}.ko")
        staging.rename(dest)


def _copy_module(moddir: Path, name: str, target: Path) -> None:
    """Copy one module, decompressed: busybox insmod may not read .ko.xz or .ko.zst."""
    found = [p for p in moddir.rglob(f"{name}.ko*") if p.name in (f"{name}.ko", f"{name}.ko.xz", f"{name}.ko.zst", f"{name}.ko.gz")]
    if not found:
        raise RuntimeError(f"module {name} not found under {moddir}")
    src = found[0]
    if src.suffix == ".ko":
        shutil.copy(src, target)
    elif src.suffix == ".xz":
        target.write_bytes(lzma.decompress(src.read_bytes()))
    elif src.suffix == ".gz":
        target.write_bytes(gzip.decompress(src.read_bytes()))
    else:
        subprocess.run(["zstd", "-q", "-d", "-f", str(src), "-o", str(target)], check=True)


def _build_initramfs(modules: Path, target: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="fc-initramfs-") as tmp:
        root = Path(tmp)
        for d in ("bin", "dev", "proc", "sys", "mnt", "tmp", "lib/modules"):
            (root / d).mkdir(parents=True)
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        _build_preads(root / "bin" / "preads")
        # The kernel runs /init through its #! line before busybox has installed its links.
        (root / "bin" / "sh").symlink_to("busybox")
        for ko in modules.glob("*.ko"):
            shutil.copy(ko, root / "lib" / "modules" / ko.name)
        init = root / "init"
        init.write_text(INIT_SCRIPT)
        init.chmod(0o755)
        names = subprocess.run(["find", "."], cwd=root, check=True, capture_output=True).stdout
        archive = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input=names, check=True, capture_output=True).stdout
        partial = target.with_name(target.name + ".tmp")
        partial.write_bytes(gzip.compress(archive, compresslevel=6))
        partial.rename(target)


def _build_preads(target: Path) -> None:
    """The guest's random reader (tests/harness/preads.c), a static binary: the initramfs has no libc."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise GuestUnavailable("gcc is not installed (the guest's preads helper is built with it): run make setup")
    done = subprocess.run([gcc, "-static", "-O2", "-o", str(target), str(PREADS_C)], capture_output=True, text=True)
    if done.returncode != 0:
        raise GuestUnavailable(f"gcc -static could not build {PREADS_C.name} (libc6-dev installs the static libc: run make setup): "
                               + (done.stderr.strip().splitlines() or ["no message"])[-1])


def build_guest() -> GuestBuild:
    """The guest's kernel and initramfs, built once per kernel version and /init content."""
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    # Other test runs (other checkouts' helpers) may build at the same moment.
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        version = _candidate_version(META_PACKAGE)
        if version is None:
            built = sorted(p for p in CACHE_DIR.glob(f"{META_PACKAGE}_*") if not p.name.endswith(".tmp"))
            if not built:
                raise GuestUnavailable(f"apt knows no {META_PACKAGE} (run apt-get update) and no guest is cached")
            kdir = built[-1]
        else:
            kdir = CACHE_DIR / f"{META_PACKAGE}_{version}"
            if not kdir.exists():
                _unpack_kernel(kdir)
        busybox = Path(BUSYBOX).read_bytes()
        key = hashlib.sha256(INIT_SCRIPT.encode() + hashlib.sha256(busybox).digest() + PREADS_C.read_bytes()).hexdigest()[:16]
        initramfs = kdir / f"initramfs-{key}.cpio.gz"
        if not initramfs.exists():
            _build_initramfs(kdir / "modules", initramfs)
        return GuestBuild(kernel=kdir / "vmlinuz", initramfs=initramfs, version=kdir.name)


def make_disk(image: Path, files: dict[str, int | bytes], size_mib: int | None = None, block_size: int | None = None) -> Path:
    """An ext4 image holding `files` (name -> bytes, or a size for random content), via `mkfs.ext4 -d`.

    block_size 4096 makes the guest's page-cache pages line up with the image's pages (mkfs picks 1 KiB below 512 MB).
    """
    with tempfile.TemporaryDirectory(prefix="fc-disk-") as tmp:
        total = 0
        for name, content in files.items():
            path = Path(tmp) / name
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "wb") as f:
                if isinstance(content, bytes):
                    f.write(content)
                    total += len(content)
                else:
                    for off in range(0, content, 1 << 20):
                        f.write(os.urandom(min(1 << 20, content - off)))
                    total += content
        if size_mib is None:
            size_mib = total // (1 << 20) * 11 // 10 + 32
        subprocess.run(
            ["mkfs.ext4", "-q", "-F", *(["-b", str(block_size)] if block_size else []),
             "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", tmp, str(image), f"{size_mib}M"],
            check=True,
            capture_output=True,
        )
    return image


class QmpSync:
    """A minimal blocking QMP client for the test's own commands (events are skipped)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.file = self.sock.makefile("rb")
        json.loads(self.file.readline())  # greeting
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError(f"QMP closed during {command}")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise RuntimeError(f"QMP {command}: {reply['error'].get('desc')}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class CommandChannel:
    """The host end of the guest's command channel: a unix socket wired to the guest's ttyS1."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock: socket.socket | None = None
        self.buf = b""

    def connect(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(self.path))
                self.sock = s
                self.buf = b""
                return
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def _read_until(self, marker: bytes, deadline: float) -> bytes | None:
        """Everything up to and including `marker`, or None at the deadline."""
        assert self.sock is not None
        while marker not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return None
            if not chunk:
                raise ConnectionError("guest command channel closed")
            self.buf += chunk
        head, _, self.buf = self.buf.partition(marker)
        return head + marker

    def wait_ready(self, timeout: float) -> None:
        """Ping until the guest answers: bytes sent before its loop opened ttyS1 are lost."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.run("true", timeout=min(2.0, max(0.1, deadline - time.monotonic())), check_timeout=False) is not None:
                return
        raise TimeoutError(f"guest command channel not ready after {timeout:.0f} s")

    def run(self, cmd: str, timeout: float = 60.0, check_timeout: bool = True) -> tuple[int, str] | None:
        assert self.sock is not None
        if "\n" in cmd:
            raise ValueError("one line per command")
        nonce = secrets.token_hex(6)
        self.sock.sendall(f"{nonce} {cmd}\n".encode())
        deadline = time.monotonic() + timeout
        start = f"@@fc-start {nonce}\n".encode()
        if self._read_until(start, deadline) is not None:
            done = f"\n@@fc-done {nonce} ".encode()
            body = self._read_until(done, deadline)
            if body is not None:
                rc = self._read_until(b"\n", deadline)
                if rc is not None:
                    return int(rc.strip()), body[: -len(done)].decode(errors="replace")
        if check_timeout:
            raise TimeoutError(f"guest command timed out after {timeout} s: {cmd}")
        return None

    def check(self, cmd: str, timeout: float = 120.0) -> str:
        """Run a command that must succeed; its output."""
        result = self.run(cmd, timeout)
        assert result is not None
        rc, out = result
        if rc != 0:
            raise RuntimeError(f"guest command failed ({rc}): {cmd}\n{out}")
        return out

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo inside the guest, in bytes."""
        info = {}
        for line in self.check("cat /proc/meminfo").splitlines():
            key, _, rest = line.partition(":")
            fields = rest.split()
            if fields:
                info[key] = int(fields[0]) * (1024 if fields[1:] == ["kB"] else 1)
        return info

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def kernel_cmdline(mount: str = "ro") -> str:
    return f"console=ttyS0 panic=-1 loglevel=4 fc.mount={mount}"


class Guest:
    """One QEMU TCG guest: start it on a disk, run commands in it, stop it by PID."""

    def __init__(self, workdir: Path, build: GuestBuild | None = None) -> None:
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.build = build or build_guest()
        self.proc: subprocess.Popen[bytes] | None = None
        self.console_log = self.workdir / "console.log"
        self.ctl_sock = self.workdir / "qmp-ctl.sock"
        self.cmd_sock = self.workdir / "cmd.sock"
        self.qmp_sock: Path | None = None
        self.channel = CommandChannel(self.cmd_sock)
        self._qmp: QmpSync | None = None

    def start(
        self,
        disk_path: Path | str,
        memory_mib: int = 512,
        qmp_sock: Path | str | None = None,
        extra: list[str] | None = None,
        mount: str = "ro",
        name: str = "fc-guest",
        boot_timeout: float = 60.0,
        disk_format: str = "raw",
    ) -> None:
        """Boot the guest on disk_path (`disk_format`: raw, or qcow2 for an overlay); return once its command channel answers."""
        self.qmp_sock = Path(qmp_sock) if qmp_sock else self.workdir / "qmp.sock"
        for p in (self.ctl_sock, self.cmd_sock, self.qmp_sock):
            p.unlink(missing_ok=True)
        cmd = [
            "qemu-system-x86_64",
            "-name", name,
            "-accel", "tcg",
            "-m", str(memory_mib),
            "-smp", "1",
            "-nodefaults",
            "-display", "none",
            "-no-reboot",
            "-kernel", str(self.build.kernel),
            "-initrd", str(self.build.initramfs),
            "-append", kernel_cmdline(mount),
            "-drive", f"file={disk_path},format={disk_format},if=virtio,cache=none,aio=threads",
            "-device", "virtio-balloon-pci,id=balloon0",
            "-chardev", f"file,id=con,path={self.console_log}",
            "-serial", "chardev:con",
            "-chardev", f"socket,id=cmd,path={self.cmd_sock},server=on,wait=off",
            "-serial", "chardev:cmd",
            "-qmp", f"unix:{self.ctl_sock},server=on,wait=off",
            "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
            *(extra or []),
        ]  # fmt: skip
        stderr = open(self.workdir / "qemu.stderr", "wb")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stderr, stderr=stderr, start_new_session=True)
        stderr.close()
        try:
            self.channel.connect(timeout=10)
            self.channel.wait_ready(timeout=boot_timeout)
        except BaseException:
            self.stop()
            raise RuntimeError(f"guest did not boot; console:\n{self.console_tail()}\nqemu:\n{self.qemu_stderr()}")

    def console_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.console_log.read_text(errors="replace").splitlines()[-n:])
        except FileNotFoundError:
            return ""

    def qemu_stderr(self) -> str:
        try:
            return (self.workdir / "qemu.stderr").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def run(self, cmd: str, timeout: float = 120.0) -> tuple[int, str]:
        """Run one shell command line in the guest: (exit code, stdout+stderr)."""
        result = self.channel.run(cmd, timeout=timeout)
        assert result is not None
        return result

    def check(self, cmd: str, timeout: float = 120.0) -> str:
        """Run a command that must succeed; its output."""
        return self.channel.check(cmd, timeout)

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo inside the guest, in bytes."""
        return self.channel.meminfo()

    def qmp(self, command: str, **arguments: Any) -> Any:
        """A command on the test's own QMP socket (not the one handed to code under test)."""
        if self._qmp is None:
            self._qmp = QmpSync(self.ctl_sock)
        return self._qmp.execute(command, **arguments)

    def balloon(self, memory_mib: int, timeout: float = 60.0) -> int:
        """Ask the balloon for memory_mib and wait until the guest settles; the final actual, bytes."""
        target = memory_mib << 20
        self.qmp("balloon", value=target)
        deadline = time.monotonic() + timeout
        last, still = -1, 0
        while time.monotonic() < deadline:
            actual = self.qmp("query-balloon")["actual"]
            if actual == target:
                return actual
            still = still + 1 if actual == last else 0
            if still >= 6:  # the guest stopped giving pages back short of the target
                return actual
            last = actual
            time.sleep(0.5)
        return last

    def stop(self) -> None:
        """Quit over QMP, then SIGTERM, then SIGKILL: always by this guest's PID."""
        self.channel.close()
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                self.qmp("quit")
            except (OSError, RuntimeError, ValueError):
                pass
            for sig in (None, signal.SIGTERM, signal.SIGKILL):
                if sig is not None and self.proc.poll() is None:
                    os.kill(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=5)
                    break
                except subprocess.TimeoutExpired:
                    continue
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self.proc = None

    def kill(self) -> None:
        """SIGKILL the guest at once, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

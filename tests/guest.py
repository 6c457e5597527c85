"""Test-only parts of the tiny real guest: running it under a private libvirtd, and the pytest fixtures.

The guest itself (kernel, initramfs, disks, QEMU, the command channel) is
`tests.harness.tinyguest`, shared with `make demo`.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.tinyguest import (  # noqa: F401 - re-exported for the tests
    BUSYBOX,
    CommandChannel,
    Guest,
    GuestBuild,
    GuestUnavailable,
    build_guest,
    kernel_cmdline,
    make_disk,
)


def domain_xml(name: str, build: GuestBuild, disk_path: Path | str, workdir: Path, memory_mib: int = 512, mount: str = "ro") -> str:
    """A transient libvirt domain for the same guest: TCG, the disk on virtio, ttyS1 on workdir/cmd.sock.

    It runs QEMU as root (a static DAC label, no relabelling): the disk may sit
    anywhere (a pytest tmp dir, a FUSE mount without allow_other) and libvirt
    never chowns it. The balloon's statistics period is left unset, as libvirt
    leaves it by default.
    """
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory_mib}</memory>
  <currentMemory unit='MiB'>{memory_mib}</currentMemory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{build.kernel}</kernel>
    <initrd>{build.initramfs}</initrd>
    <cmdline>{kernel_cmdline(mount)}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{shutil.which("qemu-system-x86_64")}</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none' io='threads'/>
      <source file='{disk_path}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <serial type='file'><source path='{workdir}/console.log'/><target port='0'/></serial>
    <serial type='unix'><source mode='bind' path='{workdir}/cmd.sock'/><target port='1'/></serial>
    <memballoon model='virtio' freePageReporting='on'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


LIBVIRTD_START = """set -e
mount --bind {work}/nokvm /dev/kvm
for d in run:/run/libvirt lib:/var/lib/libvirt cache:/var/cache/libvirt log:/var/log/libvirt etc:/etc/libvirt; do
    mkdir -p "${{d#*:}}"
    mount --bind "{work}/${{d%%:*}}" "${{d#*:}}"
done
exec libvirtd -f {work}/etc/libvirtd.conf -p {work}/libvirtd.pid
"""


class Libvirtd:
    """A private libvirtd (system mode, as root) that touches none of the host's libvirt state.

    It runs in a mount namespace of its own (`unshare --mount`) where
    /etc/libvirt, /run/libvirt, /var/lib/libvirt, /var/cache/libvirt and
    /var/log/libvirt are bind mounts of directories under workdir, so it can
    run beside another libvirtd, and its sockets are in workdir/sock
    (`uri`). Its qemu.conf turns off per-domain /dev namespaces and virtlogd
    (`stdio_handler = "file"`), neither needed here. /dev/kvm is hidden
    behind an unreadable file: KVM cannot boot the stock kernel here, and a
    /dev/kvm that libvirt finds usable but QEMU cannot use makes libvirt
    re-probe QEMU's capabilities over and over (~25 s per domain start).
    libvirtd still wants its default `libvirt-qemu` user and group to exist:
    `ensure_users()` creates them (and group kvm) if missing.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.proc: subprocess.Popen[bytes] | None = None
        self.uri = f"qemu:///system?socket={self.workdir}/sock/libvirt-sock"

    @staticmethod
    def ensure_users() -> None:
        for group in ("kvm", "libvirt-qemu"):
            if subprocess.run(["getent", "group", group], capture_output=True).returncode != 0:
                subprocess.run(["groupadd", "--system", group], check=True)
        if subprocess.run(["getent", "passwd", "libvirt-qemu"], capture_output=True).returncode != 0:
            home = ["--no-create-home", "--home-dir", "/var/lib/libvirt", "--shell", "/usr/sbin/nologin"]
            subprocess.run(["useradd", "--system", *home, "-g", "kvm", "libvirt-qemu"], check=True)

    def start(self, timeout: float = 30.0) -> None:
        w = self.workdir
        for d in ("sock", "run", "lib", "cache", "log", "etc"):
            (w / d).mkdir(parents=True, exist_ok=True)
        nokvm = w / "nokvm"
        nokvm.touch()
        nokvm.chmod(0)
        (w / "etc" / "libvirtd.conf").write_text(f'unix_sock_dir = "{w}/sock"\nauth_unix_ro = "none"\nauth_unix_rw = "none"\n')
        (w / "etc" / "qemu.conf").write_text('namespaces = []\nstdio_handler = "file"\n')
        script = w / "start.sh"
        script.write_text(LIBVIRTD_START.format(work=w))
        log = open(w / "libvirtd.log", "wb")  # noqa: SIM115 - handed to the child
        # The script execs libvirtd: this PID is libvirtd's.
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", str(script)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + timeout
        while subprocess.run(["virsh", "-c", self.uri, "version"], capture_output=True).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                text = (w / "libvirtd.log").read_text(errors="replace")
                self.stop()
                raise RuntimeError(f"libvirtd did not start:\n{text[-3000:]}")
            time.sleep(0.2)

    def restart(self) -> None:
        """Stop libvirtd alone (SIGTERM, by PID; its domains keep running) and start it again on the same state."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGTERM)
        self.proc.wait(timeout=30)
        self.start()

    def virsh(self, *args: str) -> str:
        return subprocess.run(["virsh", "-c", self.uri, *args], check=True, capture_output=True, text=True).stdout

    def stop(self) -> None:
        """Destroy every domain, stop libvirtd by PID, then kill any QEMU it left behind by PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            names = subprocess.run(["virsh", "-c", self.uri, "list", "--name"], capture_output=True, text=True).stdout.split()
            for name in names:
                subprocess.run(["virsh", "-c", self.uri, "destroy", name], capture_output=True)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                if self.proc.poll() is None:
                    os.kill(self.proc.pid, sig)
                try:
                    self.proc.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
        for pidfile in (self.workdir / "run" / "qemu").glob("*.pid"):
            try:
                pid = int(pidfile.read_text().strip())
                # A stale pidfile's PID may belong to someone else by now.
                if b"qemu-system" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, OSError):
                pass
        self.proc = None


@pytest.fixture(scope="session")
def guest_build() -> GuestBuild:
    """The guest's kernel and initramfs (skips when QEMU or busybox-static is missing)."""
    for tool in ("qemu-system-x86_64", "mkfs.ext4", "cpio", "dpkg", "apt-get"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not Path(BUSYBOX).exists():
        pytest.skip("busybox-static not installed")
    try:
        return build_guest()
    except GuestUnavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[Libvirtd]:
    for tool in ("libvirtd", "virsh", "unshare"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            pytest.skip(f"{tool} not installed")
    if os.geteuid() != 0:
        pytest.skip("libvirtd in system mode needs root")
    pytest.importorskip("libvirt")
    Libvirtd.ensure_users()
    daemon = Libvirtd(tmp_path / "libvirt")
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()

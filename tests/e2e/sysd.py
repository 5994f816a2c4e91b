"""A real systemd (PID 1 of its own PID, mount, cgroup and network namespaces) for e2e tests.

The host stays clean. Inside, the network namespace is its own (XDP programs attach to *its*
lo, never competing with the host's), /etc, /usr and /var are overlays whose upper layer is a
tmpfs, /run and /tmp are fresh tmpfs, /sys/fs/cgroup is a cgroup2 view of a private subtree and
/sys/fs/bpf is a *new bpffs instance* (mode 0700, as systemd mounts it), the only one there
(the host's is unmounted inside first: unmounting ours leaves an empty directory, as on a host
without bpffs). Packages installed with
`dpkg -i` inside, users created by systemd-sysusers, pins made by the daemon: all of it vanishes
when the namespace dies. Kernel objects are global, but without the private bpffs pins they lose
their last reference, so programs a test attached are detached at teardown. tracefs is shared:
callers that let the apply unit's host grants change its modes put them back (see conftest.py).

Usable from Python (`Systemd`) and, for poking around by hand, from the shell:
    /usr/bin/python3 tests/e2e/sysd.py boot NAME      # prints the PID 1 (host pid)
    /usr/bin/python3 tests/e2e/sysd.py run NAME -- systemctl status
    /usr/bin/python3 tests/e2e/sysd.py shutdown NAME
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

STATE_DIR = Path("/tmp/loaderd-e2e")  # host side; bound at /run/e2e/host inside
BOOT_TARGET = "loaderd-e2e.target"

# Runs as PID 1 of the new namespaces, before systemd. The host directory ($HOSTDIR) is bound at
# /run/e2e/host first because /tmp is about to be covered by a fresh tmpfs.
_BOOT_SCRIPT = r"""
set -eu
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/e2e/host /run/e2e/ovl
mount --bind "$HOSTDIR" /run/e2e/host
for d in etc usr var; do
    o=/run/e2e/ovl/$d
    mkdir -p $o/upper $o/work
    mount -t overlay "e2e-$d" -o "lowerdir=/$d,upperdir=$o/upper,workdir=$o/work" /$d
done
# A clean machine as far as loaderd goes: state a root run left on the host (the README demo
# writes /var/lib/loaderd) is whited out in the overlay, never touched on the host. Tests that
# want such state create it inside.
rm -rf /etc/loaderd /var/lib/loaderd
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
mount -t cgroup2 -o nsdelegate cgroup2 /sys/fs/cgroup
# The host's bpffs, inherited, goes first (only from this namespace: propagation is private):
# stacked under ours, a test's `umount /sys/fs/bpf` would have shown it, and an apply then
# pinned into the host's bpffs and tmpfiles changed its mode.
while mountpoint -q /sys/fs/bpf; do umount /sys/fs/bpf; done
mount -t bpf -o mode=0700 bpf /sys/fs/bpf
ip link set lo up
mkdir -p /etc/systemd/system
printf '[Unit]\nDescription=loaderd e2e boot target\n' > /etc/systemd/system/$BOOT_TARGET
export container=loaderd-e2e
exec /lib/systemd/systemd --system --unit=$BOOT_TARGET
"""


class SystemdError(RuntimeError):
    pass


def _cgroup2_root() -> Path:
    """Where the host's cgroup2 hierarchy is mounted (hybrid hosts: /sys/fs/cgroup/unified)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            sep = parts.index("-")
            if parts[sep + 1] == "cgroup2":
                return Path(parts[4])
    raise SystemdError("no cgroup2 hierarchy mounted on the host")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


class Systemd:
    """One systemd instance. `boot()`, then `run()`/`systemctl()`/`journalctl()`, `shutdown()`."""

    def __init__(self, name: str) -> None:
        if not name.replace("-", "").isalnum():
            raise ValueError(f"bad instance name {name!r}")
        self.name = name
        self.hostdir = STATE_DIR / name  # bound at /run/e2e/host inside
        self.cgroup = _cgroup2_root() / f"loaderd-e2e-{name}"
        self.pid: int | None = None  # host pid of the namespace's PID 1 (systemd)
        self._unshare: subprocess.Popen[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def boot(self, timeout: float = 60.0) -> int:
        if self.hostdir.exists():
            raise SystemdError(f"{self.hostdir} exists: instance {self.name} already booted?")
        self.hostdir.mkdir(parents=True)
        script = self.hostdir / "boot.sh"
        script.write_text(_BOOT_SCRIPT)
        self.cgroup.mkdir(exist_ok=True)
        env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOSTDIR": str(self.hostdir),
               "BOOT_TARGET": BOOT_TARGET}
        log = open(self.hostdir / "console.log", "wb")  # noqa: SIM115 - lives with the process
        cgroup_procs = str(self.cgroup / "cgroup.procs")

        def enter_cgroup() -> None:
            # Join the private subtree before unsharing the cgroup namespace: inside, that
            # subtree is the root, so two instances (or the host) never share cgroups.
            with open(cgroup_procs, "w") as f:
                f.write(str(os.getpid()))

        self._unshare = subprocess.Popen(
            ["unshare", "--pid", "--fork", "--mount", "--mount-proc", "--cgroup", "--net",
             "--propagation", "private", "/bin/sh", str(script)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
            preexec_fn=enter_cgroup, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while self.pid is None:
            self._check_alive()
            kids = _children(self._unshare.pid)
            if kids and os.readlink(f"/proc/{kids[0]}/exe").endswith("/systemd"):
                self.pid = kids[0]
            elif time.monotonic() > deadline:
                raise SystemdError("systemd did not start: " + self.console())
            else:
                time.sleep(0.05)
        (self.hostdir / "pid").write_text(str(self.pid))
        while True:
            state = self.run("systemctl", "is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                break
            if time.monotonic() > deadline:
                raise SystemdError(f"system state {state!r} after {timeout}s: " + self.console())
            time.sleep(0.1)
        self.systemctl("start", "systemd-journald.service")
        return self.pid

    def shutdown(self, timeout: float = 30.0) -> None:
        """Power the container off; SIGKILL its PID 1 (which kills the namespace) if it hangs."""
        if self.pid is not None and os.path.exists(f"/proc/{self.pid}"):
            os.kill(self.pid, signal.SIGRTMIN + 4)  # systemd: poweroff (container: exit)
            deadline = time.monotonic() + timeout
            while os.path.exists(f"/proc/{self.pid}") and time.monotonic() < deadline:
                self._reap()
                time.sleep(0.1)
            if os.path.exists(f"/proc/{self.pid}"):
                os.kill(self.pid, signal.SIGKILL)
        if self._unshare is not None:
            try:
                self._unshare.wait(timeout)
            except subprocess.TimeoutExpired:
                self._unshare.kill()
                self._unshare.wait()
        self.pid = None
        for _ in range(50):  # the cgroup empties asynchronously after the last process exits
            try:
                self._rmdir_cgroup()
                break
            except OSError:
                time.sleep(0.1)
        shutil.rmtree(self.hostdir, ignore_errors=True)

    def _rmdir_cgroup(self) -> None:
        if not self.cgroup.exists():
            return
        for sub in sorted((p for p in self.cgroup.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        self.cgroup.rmdir()

    def _reap(self) -> None:
        if self._unshare is not None:
            self._unshare.poll()

    def _check_alive(self) -> None:
        if self._unshare is not None and self._unshare.poll() is not None:
            raise SystemdError(f"namespace exited ({self._unshare.returncode}): {self.console()}")

    def console(self) -> str:
        try:
            return (self.hostdir / "console.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    @classmethod
    def attach(cls, name: str) -> Systemd:
        """An instance booted by another process (the CLI below)."""
        inst = cls(name)
        inst.pid = int((inst.hostdir / "pid").read_text())
        return inst

    # -- running things inside ---------------------------------------------------------------

    def run(self, *argv: str, check: bool = True, timeout: float = 120.0,
            input: str | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run argv in the namespace (as root, in its mount+PID namespaces, host cwd /)."""
        if self.pid is None:
            raise SystemdError("not booted")
        base = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8",
                "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": "", "SYSTEMD_LOG_COLOR": "0"}
        proc = subprocess.run(
            ["nsenter", "-t", str(self.pid), "-m", "-p", "-n", "--wd=/", "--", *argv],
            capture_output=True, text=True, timeout=timeout, input=input,
            env={**base, **(env or {})})
        if check and proc.returncode != 0:
            raise SystemdError(f"{shlex.join(argv)} exited {proc.returncode}:\n"
                               f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc

    def sh(self, script: str, check: bool = True, timeout: float = 120.0,
           ) -> subprocess.CompletedProcess[str]:
        return self.run("/bin/sh", "-ec", script, check=check, timeout=timeout)

    def systemctl(self, *args: str, check: bool = True, timeout: float = 120.0,
                  ) -> subprocess.CompletedProcess[str]:
        try:
            return self.run("systemctl", "--no-pager", *args, check=check, timeout=timeout)
        except SystemdError as exc:  # say why, not just "see journalctl"
            tail = self.journalctl("-n", "40", "-o", "short-monotonic", check=False).stdout
            raise SystemdError(f"{exc}\n--- journal tail:\n{tail}") from None

    def journalctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run("journalctl", "--no-pager", *args, check=check)

    def journal_json(self, *args: str) -> list[dict[str, object]]:
        self.run("journalctl", "--sync", check=False)  # make sure journald flushed the socket
        out = self.journalctl("-o", "json", *args, check=False).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def show(self, unit: str, *props: str) -> dict[str, str]:
        out = self.systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Create a file inside the namespace (lands in an overlay/tmpfs, never on the host)."""
        self.run("install", "-D", "-m", f"{mode:o}", "/dev/stdin", path, input=text)

    def copy_in(self, host_path: str | os.PathLike[str]) -> str:
        """Make a host file visible inside; returns its path in the namespace."""
        dest = self.hostdir / "files" / Path(host_path).name
        dest.parent.mkdir(exist_ok=True)
        shutil.copy2(host_path, dest)
        return f"/run/e2e/host/files/{dest.name}"

    def install_deb(self, deb: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        """`dpkg -i` exactly as an operator would, into the namespace's overlays."""
        inside = self.copy_in(deb)
        proc = self.run("dpkg", "-i", inside, timeout=300)
        self.systemctl("daemon-reload")
        return proc

    def wait_for(self, unit: str, state: str = "active", timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            now = self.show(unit, "ActiveState")["ActiveState"]
            if now == state:
                return now
            if now == "failed" or time.monotonic() > deadline:
                raise SystemdError(f"{unit} is {now}, wanted {state}:\n" + self.journalctl(
                    "-u", unit, "-n", "60", check=False).stdout)
            time.sleep(0.2)


def main(argv: Sequence[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("boot", "run", "shutdown"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, name, rest = argv[0], argv[1], list(argv[2:])
    if cmd == "boot":
        # The namespace outlives this process (own session); `shutdown NAME` ends it.
        inst = Systemd(name)
        print(inst.boot())
        inst._unshare = None  # leave it running
        return 0
    inst = Systemd.attach(name)
    if cmd == "shutdown":
        inst.shutdown()
        return 0
    if rest[:1] == ["--"]:
        rest = rest[1:]
    proc = inst.run(*rest, check=False)
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The resident daemon: apply (in a child), drop every capability, READY=1, then watch.

The resident process never imports bcc: compile/load/pin/attach happen in a short-lived
`loaderd apply` child that inherits the unit's capabilities (or, packaged, in
loaderd-apply.service: `run --no-apply`). Once that is done, the resident drops every capability
for good (a dropped capability never comes back, which is why a reload runs a fresh privileged
apply). It then pings the watchdog, re-reads the manifest on SIGHUP (RELOADING=1 ... READY=1),
and checks for drift (pins, links, tags, frozen state) on a timer. Perf buffers are read
through perf events the apply hands over on a datagram socket (bpf.handover), which is why the
socket exists before the apply child runs. Its event counters go to state_dir/events.json for
`loaderd status`. Stopping never detaches or unpins anything.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from types import FrameType

from loaderd import privileges
from loaderd.audit import log as audit
from loaderd.audit.log import Event
from loaderd.bpf import handover, kernel, pins
from loaderd.errors import LoaderdError, plural
from loaderd.model import Settings
from loaderd.observe import drift, metrics
from loaderd.observe import status as status_report
from loaderd.observe.status import fill
from loaderd.runtime.eventpump import EventPump
from loaderd.runtime.notify import PROGRESS, notify, status
from loaderd.store import textfile
from loaderd.store.manifest import EMPTY, Manifest, Status
from loaderd.store.statedir import EventCounts, Refusal, State, tree_digest

DRIFT_INTERVAL = 30.0
FILL_WARN = 0.9  # a map this full is journaled (MAP_FILLING) once, until it empties below


def run_apply_child(config: str | None,
                    apply_main: Callable[[list[str]], int] | None = None) -> int:
    """Run `loaderd apply --child` in a child process with this process's capabilities. The
    child's progress lines are relayed as STATUS= (with the default NotifyAccess=main, systemd
    accepts notifications from the main process only).

    With `apply_main` (the CLI's main) the child is forked, not spawned: it starts with the
    interpreter and the modules already imported here (settings, schema, audit, model), where
    a second interpreter spent 150-250 ms starting and importing them again. Everything else
    it needs (the applier; bcc only when something compiles) it imports itself, so none of it
    is ever mapped here. Capabilities are the same either way (a fork keeps them; root's
    execve kept them too), and so are its stdout (a pipe), its signal dispositions (the
    defaults) and its exit code."""
    argv = ["apply", "--child"] + (["--config", config] if config else [])
    if apply_main is None:
        cmd = [sys.executable, "-m", "loaderd", *argv]
        with subprocess.Popen(cmd, close_fds=True, stdout=subprocess.PIPE,
                              text=True) as child:
            assert child.stdout is not None
            _relay(child.stdout)
        return child.returncode
    rfd, wfd = os.pipe2(os.O_CLOEXEC)
    for stream in (sys.stdout, sys.stderr):  # nothing buffered here is written twice
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the caller's frames
        code = 1
        try:
            os.close(rfd)
            signal.set_wakeup_fd(-1)
            for sig in (signal.SIGHUP, signal.SIGTERM):
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.dup2(wfd, 1)
            os.close(wfd)
            code = apply_main(argv)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # main() maps errors to codes; this is the last guard
            code = 1
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(BaseException):
                    stream.flush()
            # No interpreter finalization (15% of a restart, and the parent's atexit
            # handlers are not the child's to run): everything it wrote is closed or synced.
            os._exit(code)
    os.close(wfd)
    with os.fdopen(rfd, encoding="utf-8", errors="replace") as out:
        _relay(out)
    _pid, wstatus = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(wstatus)


def _relay(lines: Iterable[str]) -> None:
    for line in lines:
        if line.startswith(PROGRESS):
            status(line[len(PROGRESS):].strip())


class Daemon:
    def __init__(self, settings: Settings, config: str | None,
                 drift_interval: float = DRIFT_INTERVAL, apply: bool = True,
                 apply_main: Callable[[list[str]], int] | None = None) -> None:
        self.settings = settings
        self.apply_main = apply_main  # the CLI's main(): the apply child is forked
        self.config = config
        self.apply = apply  # False: a separate privileged unit applies (loaderd-apply.service)
        self.state = State(settings.state_dir, pin_root=settings.bpffs_root)
        self.drift_interval = drift_interval
        self.stop = False
        self.reread = False
        self.manifest: Manifest = EMPTY
        self.known_drift: dict[str, list[str]] = {}
        self.pump: EventPump | None = None
        self._wake = -1
        self._manifest_ident: tuple[int, int] | None = None
        self._refused_ident: tuple[int, int] | None = None
        self._hold_ident: tuple[int, int] | None = None
        self.refusal: Refusal | None = None
        self.settings_refused: LoaderdError | None = None  # the settings file, at the reload
        self.apply_rc = 0  # the apply child's exit code (run without --no-apply)
        self._shown = ""  # the STATUS= last sent
        self._applying_ident: tuple[int, int] | None = None
        self.reloaded = False  # the set shown is the one a `systemctl reload` re-read
        self._metrics_error: str | None = None  # the write failure last journaled
        self._counts_error: str | None = None
        self._counts_at = 0.0  # monotonic time of the last counters write
        self.filling: set[tuple[str, str]] = set()  # maps journaled as >= FILL_WARN full
        self.bpffs_missing: str | None = None  # no bpffs holds the pin root (drift says why)
        self._spool_shown: tuple[object, int] = (None, 0)  # the spool backlog STATUS= says
        self.sock: socket.socket | None = None  # perf events handed over by the apply
        self._bound: tuple[str, int] | None = None  # (path, inode) of a socket bound here

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.reread = True
        else:
            self.stop = True

    def _install_signals(self) -> None:
        """Before anything else (a SIGHUP right after READY must not kill us). The wakeup fd
        makes a signal end the loop's wait at once instead of after the tick."""
        rfd, wfd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._wake = rfd
        signal.set_wakeup_fd(wfd)
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _wait(self, timeout: float) -> None:
        poller = select.poll()
        poller.register(self._wake, select.POLLIN)
        for fd in self.pump.fds() if self.pump else []:
            poller.register(fd, select.POLLIN)
        poller.poll(int(timeout * 1000))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake, 64):
                pass

    def _handover_socket(self) -> socket.socket | None:
        """Where loaderd-apply hands perf events over (bpf.handover): the socket systemd passes
        (loaderd-handover.socket, FileDescriptorName=handover), else one bound here in the
        state directory, before the apply child runs so that its handover waits in it."""
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        if os.environ.get("LISTEN_PID") == str(os.getpid()):
            count = int(os.environ.get("LISTEN_FDS", "0") or 0)
            for i in range(count):
                if i < len(names) and names[i] == "handover":
                    try:
                        return handover.adopt(3 + i)
                    except (OSError, ValueError) as exc:
                        audit.emit(Event.DEGRADED, f"the handover socket systemd passed is "
                                   f"unusable ({exc}): perf buffers are not read",
                                   reason="handover socket")
                        return None
        path = handover.socket_path(self.settings.state_dir)
        try:
            sock = handover.bind(path)
        except OSError as exc:
            audit.emit(Event.DAEMON, f"no handover socket ({path}: {exc.strerror or exc}): "
                       "perf buffers are read only if this process can open them itself",
                       file=path)
            return None
        self._bound = (path, os.stat(path).st_ino)  # the file bind made, not the sockfs inode
        return sock

    def _close_socket(self) -> None:
        if self.sock is None:
            return
        with contextlib.suppress(OSError):
            # Ours, not systemd's: remove it (only if still the one we bound)
            if self._bound is not None and os.stat(self._bound[0]).st_ino == self._bound[1]:
                os.unlink(self._bound[0])
        self.sock.close()
        self.sock = None

    def start(self) -> int:
        self._install_signals()
        self.sock = self._handover_socket()
        rc = 0
        if self.apply:
            status("applying specs")
            rc = run_apply_child(self.config, self.apply_main)
        self.apply_rc = rc
        self._load_manifest()
        if rc != 0 and not self.manifest.specs:
            status("apply failed and nothing was applied before; see journal")
            audit.emit(Event.DAEMON, "initial apply failed and no earlier set exists; exiting",
                       rc=rc)
            return 1
        # Perf buffers are CPU-wide perf events (CAP_PERFMON): handed over by the apply, or
        # opened while the unit's capabilities are still here; they stay open after the drop.
        self.pump = EventPump(self.settings, self.sock)
        self.pump.sync(self.manifest)
        caps = privileges.drop_all()
        left = ("" if not caps.bounding else "; bounding set kept "
                + ",".join(privileges.names(caps.bounding))
                + " (no CAP_SETPCAP to drop it; no_new_privs keeps it unusable)")
        audit.emit(Event.CAPS_DROPPED, "dropped capabilities: effective, permitted, "
                   f"inheritable and ambient now empty; no_new_privs set{left}",
                   cap_effective=f"{caps.effective:x}", cap_permitted=f"{caps.permitted:x}",
                   cap_bounding=f"{caps.bounding:x}", cap_ambient=f"{caps.ambient:x}",
                   no_new_privs=caps.no_new_privs)
        n = len(self.manifest.specs)
        # Say what is true now, not what the manifest claims: after a reboot with a refused
        # apply (loaderd-apply.service failed, Wants= let us start) its pins may be gone.
        self.check_drift()
        self.write_metrics()
        summary = self.summary()
        self._shown = summary
        notify(f"READY=1\nSTATUS={summary}")
        audit.emit(Event.DAEMON, f"ready: {summary}", specs=n, pid=os.getpid())
        return self.loop()

    def summary(self) -> str:
        """One line for `systemctl status loaderd`: what is applied, whether the last apply
        was refused (why and since when: /etc is then not what is applied), the kill switch,
        drift."""
        n = len(self.manifest.specs)
        if self.manifest.status is Status.DISABLED:
            at = self.manifest.written_at
            when = f" at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}" if at else ""
            return (f"kill switch pulled{when}: nothing applied until `loaderd enable`, "
                    "then reload")
        text = f"{plural(n, 'spec')} applied" + (" (reloaded)" if self.reloaded else "")
        killed = self.state.interrupted()
        if killed is not None or self.manifest.status is Status.PENDING:
            when = "" if killed is None else " at " + time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(killed))
            text += f"; last apply INTERRUPTED{when} (killed before it finished); " + (
                "its commit is PENDING: the next apply rolls it forward"
                if self.manifest.status is Status.PENDING
                else "the set before it stays applied" if n else "nothing was applied before it")
        elif self.refusal is not None:
            text += f"; {self.refusal.sentence()}; " + (
                "the set before it stays applied" if n else "nothing was applied before it")
        elif self.apply_rc != 0:
            text += "; last apply FAILED, old set kept (see journal)"
        if self.settings_refused is not None:
            text += (f"; settings file REFUSED at reload: {self.settings_refused}; nothing "
                     "applied from it (the resident runs with the settings read at its start)")
        hold = self.state.hold()
        if hold is not None:
            text += "; " + hold.sentence(tree_digest(self.settings.programs_dir)
                                         != hold.programs_sha256)
        lost = {k: c["lost"] for k, c in (self.pump.counters() if self.pump else {}).items()
                if c["lost"]}
        if lost:
            text += f"; {sum(lost.values())} events lost by the kernel in " + ", ".join(
                sorted(lost)) + " (see journal)"
        if self.known_drift:
            names = sorted(self.known_drift)
            text += f"; DRIFT in {len(names)}: {', '.join(names)}" + (
                f": {self.bpffs_missing}" if self.bpffs_missing else "") + " (see journal)"
        backlog, dropped = audit.backlog(), audit.spool_dropped()
        if backlog is not None:
            text += "; " + backlog.sentence(dropped)
        elif dropped:
            text += f"; journald unreachable: {dropped} events dropped (spool full)"
        return text

    def check_spool(self) -> None:
        """Events spooled while journald was unreachable (audit.spool) go to the journal once
        it is back, marked LOADERD_REPLAYED=1; until then STATUS= says how many wait where."""
        state = (audit.backlog(), audit.spool_dropped())
        if state == (None, 0):
            self._spool_shown = state
            return
        done = audit.replay_spool()
        if done is not None:
            span = " to ".join(dict.fromkeys(time.strftime(
                "%Y-%m-%d %H:%M:%S", time.localtime(t)) for t in (done.since, done.until)))
            extra = "".join([f"; {done.skipped} unreadable lines skipped" if done.skipped
                             else "", f"; {done.dropped} dropped (spool full)" if done.dropped
                             else "", f"; {done.left} kept for later (journald went away "
                             "again)" if done.left else ""])
            audit.emit(Event.DAEMON, f"journald reachable again: replayed {done.events} "
                       f"events spooled while it was not ({span}), marked LOADERD_REPLAYED=1"
                       + extra, replayed_events=done.events, spool_skipped=done.skipped,
                       spool_dropped=done.dropped)
            state = (audit.backlog(), audit.spool_dropped())
        if state != self._spool_shown:
            self._spool_shown = state
            self._show()

    def _show(self, extra: str = "") -> None:
        """STATUS= when it changed (or with another notification)."""
        summary = self.summary()
        if extra or summary != self._shown:
            self._shown = summary
            notify(f"{extra}STATUS={summary}")

    def loop(self) -> int:
        if self._wake < 0:
            self._install_signals()
        wd_usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        if os.environ.get("WATCHDOG_PID") not in (None, str(os.getpid())):
            wd_usec = 0
        tick = min(wd_usec / 2e6 if wd_usec else 5.0, 5.0, self.drift_interval)
        next_drift = time.monotonic() + self.drift_interval
        if self.pump is None:
            self.pump = EventPump(self.settings, self.sock)
            self.pump.sync(self.manifest)
        while not self.stop:
            if wd_usec:
                notify("WATCHDOG=1")
            if self.reread:
                self.reread = False
                # systemd shows "reloading" until READY=1 (Type=notify honours RELOADING=1).
                notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}\n"
                       "STATUS=reloading: re-reading the manifest")
                self._load_manifest()
                self._check_settings()
                self.known_drift.clear()
                self.apply_rc = 0  # a refused reload leaves its record (self.refusal)
                self.reloaded = True
                n = len(self.manifest.specs)
                self.pump.sync(self.manifest)
                self._show("READY=1\n")
                self.write_metrics()
                audit.emit(Event.RELOAD, f"manifest re-read after reload: {self.summary()}",
                           specs=n)
            elif self._state_changed():  # `loaderd disable`/`enable`/`apply` by hand: no SIGHUP
                self._load_manifest()
                self.known_drift.clear()
                self.reloaded = False
                self.pump.sync(self.manifest)
                self.check_drift()
                self._show()
                self.write_metrics()
                audit.emit(Event.DAEMON, f"state changed on disk: {self.summary()}",
                           specs=len(self.manifest.specs))
            if time.monotonic() >= next_drift:
                self.check_drift()
                self.check_fill()
                next_drift = time.monotonic() + self.drift_interval
                self._show()
                self.write_metrics()
            self.check_spool()
            self._wait(tick)  # wakes on events, signals or the tick
            self.pump.pump()
            if self.pump.changed and time.monotonic() - self._counts_at >= 1.0:
                self.pump.changed = False  # a loss or drop: in status within a second
                self.write_counts()
        self.write_metrics()  # final counters: what was journaled before the stop
        self.pump.close()
        self._close_socket()
        notify("STOPPING=1")
        audit.emit(Event.DAEMON, "stopping; pinned programs stay attached", pid=os.getpid())
        return 0

    def _check_settings(self) -> None:
        """Re-read the settings file at a reload, only to say whether it is refused: the apply
        refused it too (no refusal record: its state_dir is not known), and otherwise only the
        apply unit's journal would tell."""
        from loaderd.config.settings import load_default  # off the start path: reloads only

        try:
            load_default(self.config)  # what `loaderd run` read at its start
        except LoaderdError as exc:
            self.settings_refused = exc
        else:
            self.settings_refused = None

    def _refusal_now(self) -> Refusal | None:
        """The refusal metrics report: the record, or the settings file's at the last reload."""
        if self.refusal is None and self.settings_refused is not None:
            return Refusal(time.time(), 1, f"settings {self.settings_refused}")
        return self.refusal

    def _load_manifest(self) -> None:
        """Read the manifest and remember which file it was, so that the drift tick does not
        take our own re-read for someone else's change (one RELOAD event per reload)."""
        self._manifest_changed()  # stat first: a commit landing in between is re-read later
        self._refused_changed()
        self._hold_changed()
        self.refusal = self.state.refusal()
        try:
            self.manifest = self.state.manifest()
        except LoaderdError as exc:  # untrusted state: keep watching what we knew, say why
            audit.emit(Event.DAEMON, f"manifest not re-read: {exc}; still watching the "
                       f"{plural(len(self.manifest.specs), 'spec')} read before",
                       file=exc.location.file, field=exc.location.field)

    def _manifest_changed(self, update: bool = True) -> bool:
        try:
            st = os.stat(self.state.manifest_path)
        except FileNotFoundError:
            return False
        ident = (st.st_ino, st.st_mtime_ns)
        changed = self._manifest_ident is not None and ident != self._manifest_ident
        if update:
            self._manifest_ident = ident
        return changed

    def _hold_changed(self) -> bool:
        """The rollback hold was requested or released (no SIGHUP comes with a release)."""
        try:
            st = os.stat(self.state.hold_path)
            ident: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            ident = None
        changed = ident != self._hold_ident
        self._hold_ident = ident
        return changed

    def _refused_changed(self) -> bool:
        try:
            st = os.stat(self.state.refused_path)
            ident: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            ident = None
        changed = ident != self._refused_ident
        self._refused_ident = ident
        return changed

    def _applying_changed(self) -> bool:
        """The applying marker appeared or went (seen only while no apply holds the lock: a
        marker then is a killed apply's)."""
        try:
            st = os.stat(self.state.applying_path)
            ident: tuple[int, int] | None = (st.st_ino, st.st_mtime_ns)
        except OSError:
            ident = None
        changed = ident != self._applying_ident
        self._applying_ident = ident
        return changed

    def _state_changed(self) -> bool:
        """The manifest or the refusal record changed since we read them (not while an apply
        holds the lock: it is re-read once that apply is done)."""
        with self.state.quiet() as quiet:
            if not quiet:
                return False
            manifest = self._manifest_changed()
            hold = self._hold_changed()
            refused = self._refused_changed()
            return self._applying_changed() or refused or manifest or hold

    def check_fill(self) -> None:
        """Journal once when a map crosses FILL_WARN (again after it fell below it): a full
        hash silently stops counting, a full ring silently drops."""
        for name, record in self.manifest.specs.items():
            for mname in record.maps:
                fd = -1
                try:
                    path = os.path.join(record.pin_dir, "maps", mname)
                    fd = kernel.obj_get(path, rdonly=True)
                    info = kernel.map_info(fd)
                    facts = fill(fd, info, path)
                except LoaderdError:
                    continue  # a WRONLY map, or gone: drift says so
                finally:
                    if fd >= 0:
                        os.close(fd)
                ratio = facts.get("fill")
                key = (name, mname)
                if ratio is None or ratio < FILL_WARN:
                    self.filling.discard(key)
                elif key not in self.filling:
                    self.filling.add(key)
                    if "entries" in facts:
                        what = (f"{facts['entries']} of {info.max_entries} entries; a full "
                                "hash refuses new keys and its program silently stops "
                                "counting: use lru_hash for keys that come and go, or delete "
                                "entries")
                    else:
                        what = (f"{facts['bytes_pending']} bytes unread; a full ring drops "
                                "new records uncounted: give it a reader (events: lets the "
                                "daemon read it)")
                    audit.emit(Event.MAP_FILLING, f"{name}/{mname}: {ratio:.0%} full ({what})",
                               spec=name, map=mname, fill=ratio, entries=facts.get("entries"))

    def check_drift(self) -> dict[str, list[str]]:
        """Journal each new difference between the manifest and the kernel once. Not while an
        apply holds the lock: pins are being swapped then, and a half-swapped set is not drift
        (the next check sees the committed truth). A commit left pending by a crashed apply is
        checked: that is a difference worth a critical event."""
        with self.state.quiet() as quiet:
            if not quiet or self._manifest_changed(update=False):  # re-read it first
                return self.known_drift
            found: dict[str, list[str]] = {}
            missing = pins.bpffs_missing(self.settings.bpffs_root) if self.manifest.specs \
                else None
            if missing is not None:  # one sentence for all, not every pin of every spec
                found = {name: [missing[1]] for name in self.manifest.specs}
                if missing[1] != self.bpffs_missing:
                    audit.emit(Event.DRIFT, f"{missing[1]}; fix: {pins.bpffs_fix(missing[0])}",
                               file=missing[0], specs=sorted(found))
            else:
                for name, record in self.manifest.specs.items():
                    diffs = drift.differences(record)
                    if diffs:
                        found[name] = diffs
                        if diffs != self.known_drift.get(name):
                            audit.emit(Event.DRIFT, f"{name}: drift detected: "
                                       f"{'; '.join(diffs)}", spec=name, diffs=diffs)
            self.bpffs_missing = None if missing is None else missing[1]
            self.known_drift = found
            return found

    def write_counts(self) -> None:
        """The event counters for `loaderd status` (state_dir/events.json); a failed write is
        journaled once, until one works again."""
        self._counts_at = time.monotonic()
        counts = EventCounts(time.time(), os.getpid(), self.pump.counts() if self.pump else ())
        try:
            self.state.save_event_counts(counts)
        except (OSError, LoaderdError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._counts_error:
                audit.emit(Event.DEGRADED, f"event counters not written for status: {why}",
                           reason="event counters not written", file=self.state.events_path)
            self._counts_error = why
            return
        self._counts_error = None

    def write_metrics(self) -> None:
        """loaderd.prom in node_exporter's textfile directory (settings.metrics_dir), from the
        same report `loaderctl status --json` prints, when that directory exists. A failed
        write is journaled once (until it works again): metrics must never stop the daemon."""
        self.write_counts()
        where = self.settings.metrics_dir
        if where is None or not os.path.isdir(where):
            return
        try:
            report = status_report.status(status_report.view_for(self.settings))
            text = metrics.render(metrics.samples(metrics.Inputs(
                report, self.manifest.last_apply, self._refusal_now(),
                self.pump.counts() if self.pump else (), time.time())))
            textfile.write(where, metrics.FILE_NAME, text)
        except (OSError, LoaderdError) as exc:
            why = f"{type(exc).__name__}: {exc}"
            if why != self._metrics_error:
                audit.emit(Event.DEGRADED, f"metrics not written to {where}: {why}",
                           reason="metrics not written", file=where)
            self._metrics_error = why
            return
        if self._metrics_error is not None:
            audit.emit(Event.DAEMON, f"metrics written to {where} again", file=where)
        self._metrics_error = None

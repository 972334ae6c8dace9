"""Processes of ktel's local stack: started in their own session, tied to the
parent's life, stopped gently then firmly, their logs tailed on failure; and
their ports: free ones to give them, and who listens where."""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Self

import psutil

_PR_SET_PDEATHSIG = 1
# What stops the local stack: Ctrl-C, and `ktel down`'s SIGTERM.
STOP_SIGNALS = frozenset({signal.SIGINT, signal.SIGTERM})


class Interrupted(BaseException):
    """Ctrl-C or SIGTERM, raised by the handler of a command of the local stack (`ktel
    up` while it starts, `ktel cluster`) to end the wait where it is (a download, a
    server's readiness, a tool's run: minutes all told), once; not an Exception, so that
    no wait that retries on its failures takes it for one, as KeyboardInterrupt."""


class Server:
    """A server of the local stack (Kafka, Prometheus, the Collector): its process
    and its log, so `ktel up` can tell when one has died and show why."""

    log_path: Path
    _proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The code it exited with after it was started; None while it runs, or when
        it was never started or has been stopped."""
        return None if self._proc is None else self._proc.poll()

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float = 30) -> None:
        """SIGTERM, on which each server shuts down cleanly; SIGKILL after ``timeout`` s."""
        stop(self._proc, timeout)
        self._proc = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _check_started(self, name: str) -> None:
        """While waiting for it to be ready: it must not have exited."""
        if self._proc is None or self._proc.poll() is not None:
            code = None if self._proc is None else self._proc.returncode
            raise RuntimeError(
                f"{name} exited during startup (exit {code}); tail of {self.log_path}:\n{tail(self.log_path)}"
            )


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM arriving within the block take effect at its end: around a
    process's ``spawn`` and the keeping of what it returns, so that a stop signal's
    handler that raises (`ktel up`'s while it starts, Python's KeyboardInterrupt) finds
    the process kept, to be stopped with the rest. Raised inside subprocess.Popen once
    the child was forked, or before its caller kept it, the exception lost the child:
    left running, never stopped, until its parent's exit killed it uncleanly.

    Held in the main thread, where Python runs signal handlers, by two means: the
    signals are blocked there, and their handlers, meanwhile, only note them (run again
    at the end). Blocking alone let a signal sent to the process reach another thread,
    not blocking it, and Python then ran its handler in the main thread within the block
    all the same (a test runner's threads; a tool that signals its parent at once, as
    the test of `ktel down` during a tool does, made that a race under load)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []

    def note(sig: int, _frame: object) -> None:
        arrived.append(sig)

    # (a handler not installed from Python, None here, cannot be put back: left alone)
    handlers = {sig: h for sig in STOP_SIGNALS if (h := signal.getsignal(sig)) is not None}
    for sig in handlers:
        signal.signal(sig, note)
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        # What arrived blocked is delivered here, to ``note``; then the handlers are put
        # back and run for what was noted, the first in the order they came.
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for noted in dict.fromkeys(arrived):
            signal.raise_signal(noted)


def spawn(
    argv: list[str], log_path: Path, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start a server with stdout+stderr appended to log_path, in its own session.
    Called within ``stop_signals_held``, whose held signals the child does not inherit."""
    log = open(log_path, "ab")  # noqa: SIM115 - the child keeps writing after we return
    log.write(f"\n===== ktel: starting {argv[0]} at {time.ctime()} =====\n".encode())
    log.flush()
    try:
        return subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own session: a Ctrl-C meant for pytest doesn't reach the server half-way
            # through a test; we stop it ourselves.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
        )
    finally:
        log.close()  # the child has its own copy of the fd


# How long a tool stopped early (run) has to end on SIGINT, with what it started,
# before they are killed.
TOOL_STOP_SECONDS = 5.0

# The tools run runs now, in any thread, for tools_stopped to stop; and how many
# tools_stopped blocks are open, within which run starts none.
_tools: set[subprocess.Popen[str]] = set()
_tools_refused = 0
_tools_lock = threading.Lock()


class ToolsStopped(RuntimeError):
    """A tool that ``run`` was asked to start while ``tools_stopped`` stops them."""


def run(
    argv: Sequence[str],
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool (a build, Kafka's storage format, openssl) to its end, its output
    captured as text, in a session of its own. Stopped early, by an exception in the
    thread that runs it (a stop signal's handler that raises, in the main thread;
    ``subprocess.TimeoutExpired`` past ``timeout``), or by ``tools_stopped`` from
    another thread, it is stopped with all it started before going on: its process
    group is sent SIGINT (what Ctrl-C at a terminal sends), and what is left of it
    after TOOL_STOP_SECONDS is killed. subprocess.run kills the tool alone: the
    Collector's builder killed so left its `go build` compiling on for minutes after
    `ktel up` had exited (`ktel down`'s SIGTERM reaches `ktel up` alone, not the
    tool's children as a terminal's Ctrl-C does)."""
    child: subprocess.Popen[str] | None = None
    try:
        # A stop signal meanwhile finds the child kept; tools_stopped, once the child is
        # started, finds it among those to stop.
        with stop_signals_held(), _tools_lock:
            if _tools_refused:
                raise ToolsStopped(f"{argv[0]} not started: ktel's tools are being stopped")
            child = subprocess.Popen(
                list(argv),
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                # Its own process group, to be stopped whole; its own session, so that a
                # tool that asks at the terminal (a password, say) fails rather than
                # waits, stopped, as a background process group reading it would.
                start_new_session=True,
                preexec_fn=_die_with_parent(),
            )
            _tools.add(child)
        stdout, stderr = child.communicate(timeout=timeout)
    except BaseException:
        if child is not None:
            # A second signal meanwhile is taken once the group is stopped.
            with stop_signals_held():
                _stop_groups([child], TOOL_STOP_SECONDS)
            # Its output is not read on: a process of its that left the group would
            # hold the pipes open, and the wait with them.
            for pipe in (child.stdout, child.stderr):
                if pipe is not None:
                    pipe.close()
            child.wait()
        raise
    finally:
        if child is not None:
            with _tools_lock:
                _tools.discard(child)
    return subprocess.CompletedProcess(child.args, child.returncode, stdout, stderr)


@contextlib.contextmanager
def tools_stopped() -> Iterator[None]:
    """Stops the tools ``run`` runs now in other threads, as it stops its own on an
    exception, and has it start none within the block (it raises ToolsStopped): for a
    thread that others run tools for (a thread pool's), stopped, which would otherwise
    wait for each to its end. run stops a tool on an exception in its own thread only:
    a stop signal's handler raises in the main thread, and a terminal's Ctrl-C does
    not reach a tool in a session of its own."""
    global _tools_refused
    with _tools_lock:
        _tools_refused += 1
        running = list(_tools)
    try:
        # A second signal meanwhile is taken once the groups are stopped. Their own
        # threads read their output to its end and reap them.
        with stop_signals_held():
            _stop_groups(running, TOOL_STOP_SECONDS)
        yield
    finally:
        with _tools_lock:
            _tools_refused -= 1


def _stop_groups(children: Sequence[subprocess.Popen[str]], grace: float) -> None:
    """SIGINT to the process groups ``children`` lead, SIGKILL to what is left of
    each after ``grace`` seconds or once its leader has exited, whichever is first."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGINT)
    deadline = time.monotonic() + grace
    for child in children:
        # Waited for without being reaped: until it is, its pid (the group's id) is
        # nobody else's, and the group's stragglers are killed by it below. One that
        # run's communicate, in another thread, reaped meanwhile: what is left of its
        # group keeps the group's id from being reused.
        with contextlib.suppress(ProcessLookupError):
            if child.returncode is None:
                exited = select.poll()
                pidfd = os.pidfd_open(child.pid)
                try:
                    exited.register(pidfd, select.POLLIN)
                    exited.poll(max(0.0, deadline - time.monotonic()) * 1000)
                finally:
                    os.close(pidfd)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def _die_with_parent() -> Callable[[], None] | None:
    # PR_SET_PDEATHSIG fires when the *thread* that forked exits, not the process, so
    # only ask for it from the main thread; a server started from a worker thread
    # (asyncio.to_thread) would otherwise be killed when that thread is retired.
    if threading.current_thread() is not threading.main_thread():
        return None
    parent = os.getpid()
    libc = ctypes.CDLL(None, use_errno=True)
    # The child inherits its parent's blocked signals, and exec keeps them: started
    # within stop_signals_held it would never hear SIGINT or SIGTERM, what ktel's
    # processes and the servers stop on. Unblocked through libc: Python's
    # signal.pthread_sigmask runs the handlers due, the parent's, in the child.
    unblock = ctypes.create_string_buffer(128)  # a sigset_t (glibc's: 1024 bits)
    libc.sigemptyset(unblock)
    for sig in STOP_SIGNALS:
        libc.sigaddset(unblock, sig)

    def preexec() -> None:
        libc.pthread_sigmask(signal.SIG_UNBLOCK, unblock, None)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def stop(proc: subprocess.Popen[bytes] | None, timeout: float, sig: int = signal.SIGTERM) -> None:
    """Ask with ``sig``, SIGKILL after ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            data = f.read().decode(errors="replace")
    except OSError:
        return f"({path} not readable)"
    return "\n".join(data.splitlines()[-lines:])


def reachable(host: str) -> str:
    """Where to reach a server bound to ``host`` from this machine: a wildcard
    address on its loopback, any other as it is."""
    return {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on host:port (a wildcard host: on its loopback)."""
    host = reachable(host)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        if s.connect_ex((host, port)) != 0:
            return False
        # A connect to a port nobody listens on can be given that same port as its
        # own and connect to itself (TCP simultaneous open): that is no listener.
        return bool(s.getsockname()[1] != port)


def listening(pid: int, port: int) -> bool:
    """Whether process ``pid`` itself listens on TCP ``port``, on any address."""
    try:
        conns = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.Error:
        return False  # gone, or not yet readable
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in conns)


_handed_out: set[int] = set()
_handing_out = threading.Lock()
_random = random.Random()


def free_port() -> int:
    """A port free on 127.0.0.1 now, for a server started soon after; never the
    same one twice in this process.

    It comes from below the kernel's ephemeral range, where connect() picks local
    ports: there, any outgoing connection made before the server binds (Kafka
    clients make many) could take it, and the server would fail to start. Where
    that range starts too low to leave room below it, the kernel picks one."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 0
    with _handing_out:
        for _ in range(1000):
            port = _random.randrange(max(1024, low - 12000), low) if low > 2048 else 0
            if port in _handed_out:
                continue
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    continue  # taken, or lingering in TIME_WAIT
                port = s.getsockname()[1]
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port on 127.0.0.1")

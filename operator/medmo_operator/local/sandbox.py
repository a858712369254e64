"""Starts one container's process confined as a container runtime confines it (stdlib only).

The pod runner runs this file as a script (``python -I -S sandbox.py``, the spec as JSON on stdin)
so that nothing but the standard library is loaded before the container's command is exec'd.
Three processes, each tied to the one before it so that nothing outlives the runner:

    launcher   child of the runner thread that started it (PR_SET_PDEATHSIG: SIGKILL when that
               thread or the runner dies); forwards SIGTERM & co. to the init; exits as it exits.
    init       PID 1 of a new PID namespace (pdeathsig tied to the launcher) in new mount and UTS
               namespaces (the pod's hostname): builds the container's root (an overlay over the host's ``/``, the
               "image", with a fresh /proc, /dev and the pod's volumes at their mount paths),
               pivots into it, starts the command, forwards signals to it, reaps orphans, and exits
               with the command's exit code; the kernel then kills whatever the command left in the
               namespace, as when a container's main process ends.
    command    drops to the container's uid, gid and groups, changes to its working directory, and
               execs the command with exactly the environment it was given.

A command that cannot be started (not found, not executable, a volume that cannot be mounted)
writes why to the ``start_error`` file and exits with 127; the runner reports it as StartError.
"""

from __future__ import annotations

import ctypes
import json
import os
import platform
import signal
import stat
import sys
from dataclasses import asdict, dataclass, field

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWPID = 0x20000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x1, 0x2, 0x4, 0x8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 0x20, 0x1000, 0x4000, 0x40000
MNT_DETACH = 0x2
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
START_FAILED = 127
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
# The device nodes a runtime gives every container; bound from the host's (never created there).
DEVICES = ("null", "zero", "full", "random", "urandom", "tty")
DEV_LINKS = {"fd": "/proc/self/fd", "stdin": "/proc/self/fd/0", "stdout": "/proc/self/fd/1",
             "stderr": "/proc/self/fd/2", "ptmx": "pts/ptmx"}
MAX_SYMLINKS = 40


@dataclass
class Mount:
    """A host path bound into the container's root at ``target``."""

    source: str
    target: str
    read_only: bool = False


@dataclass
class SandboxSpec:
    """Everything the launcher needs; written by the runner as JSON on the launcher's stdin."""

    command: list[str]
    env: dict[str, str]
    uid: int
    gid: int
    groups: list[int]
    working_dir: str
    root: str  # an empty directory: the overlay's mount point (in the sandbox's mount namespace only)
    upper: str  # the overlay's upper and work directories: where the container's writes to / go
    work: str
    start_error: str
    runner_pid: int
    hostname: str = ""  # the pod's, in a UTS namespace of its own
    read_only_root: bool = False
    no_new_privileges: bool = False
    mounts: list[Mount] = field(default_factory=list)
    termination_log: str = ""  # host file bound at termination_log_path
    termination_log_path: str = "/dev/termination-log"
    open_up: list[str] = field(default_factory=list)  # paths the container's user must reach (the "image's" python)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> SandboxSpec:
        data = json.loads(text)
        data["mounts"] = [Mount(**m) for m in data["mounts"]]
        return cls(**data)


class SandboxError(Exception):
    """The container's root could not be built, or its command not started."""


_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(error)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    _check(_libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
           f"mount {source or fstype} on {target}")


def in_root(root: str, path: str) -> str:
    """``path`` inside ``root``, its symlinks resolved as if ``root`` were ``/`` (never escaping it).

    A host symlink such as /var/run -> /run must lead to the container's /run, not the host's.
    """
    parts = [p for p in path.split("/") if p]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == ".":
            continue
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = os.path.join(root, *resolved, part)
        if os.path.islink(candidate):
            hops += 1
            if hops > MAX_SYMLINKS:
                raise SandboxError(f"too many symbolic links in {path}")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            parts = [p for p in target.split("/") if p] + parts
            continue
        resolved.append(part)
    return os.path.join(root, *resolved)


def _make_mount_point(root: str, target: str, directory: bool) -> str:
    where = in_root(root, target)
    if directory:
        os.makedirs(where, exist_ok=True)
    elif not os.path.exists(where):
        os.makedirs(os.path.dirname(where), exist_ok=True)
        open(where, "a").close()
    return where


def _bind(source: str, target: str, read_only: bool, flags: int = 0) -> None:
    _mount(source, target, None, MS_BIND | MS_REC)
    if read_only or flags:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | flags | (MS_RDONLY if read_only else 0))


def _build_dev(root: str) -> None:
    dev = in_root(root, "/dev")
    os.makedirs(dev, exist_ok=True)
    _mount("tmpfs", dev, "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    for name in DEVICES:
        node = os.path.join(dev, name)
        open(node, "w").close()
        _bind(f"/dev/{name}", node, read_only=False)
    for name, target in DEV_LINKS.items():
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"))
    _mount("shm", os.path.join(dev, "shm"), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777,size=65536k")
    os.mkdir(os.path.join(dev, "pts"))
    _mount("devpts", os.path.join(dev, "pts"), "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=620")


def _open_up(root: str, path: str) -> None:
    """Let every user reach ``path`` (a host path free of symlinks) in the container's root: o+x on
    its directories, read (and search) on itself.

    chmod in the overlay copies the entry up: the host's permissions stay as they are.
    """
    parts = [p for p in path.split("/") if p]
    for depth in range(len(parts) + 1):
        current = os.path.join(root, *parts[:depth])
        try:
            mode = os.lstat(current).st_mode
        except FileNotFoundError:
            return
        last = depth == len(parts)
        wanted = (0o005 if last else 0o001) if stat.S_ISDIR(mode) else 0o004
        if mode & wanted != wanted:
            os.chmod(current, stat.S_IMODE(mode) | wanted)


def _under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _hidden_image_paths(spec: SandboxSpec) -> list[Mount]:
    """The image's python paths that a volume would hide (a clone under /tmp, where pods mount an
    emptyDir), bound back on top of it (made read-only once every mount is in place): in a real
    image they are not under a volume."""
    hidden = sorted(path for path in spec.open_up
                    if any(_under(path, mount.target) for mount in spec.mounts))
    outermost = [path for path in hidden if not any(_under(path, other) for other in hidden if other != path)]
    return [Mount(source=path, target=path) for path in outermost]


def build_root(spec: SandboxSpec) -> None:
    """In fresh mount and UTS namespaces: the container's root at ``spec.root``, then pivot into it."""
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare the mount and UTS namespaces")
    if spec.hostname:
        _check(_libc.sethostname(spec.hostname.encode(), len(spec.hostname.encode())), "sethostname")
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing mounted here reaches the host
    root = spec.root
    for option in (spec.upper, spec.work):
        if any(c in option for c in ",:\\"):
            raise SandboxError(f"overlay directory {option!r} holds ',', ':' or '\\'")
    _mount("overlay", root, "overlay", 0, f"lowerdir=/,upperdir={spec.upper},workdir={spec.work}")
    _mount("proc", _make_mount_point(root, "/proc", True), "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _bind("/sys", _make_mount_point(root, "/sys", True), read_only=True, flags=MS_NOSUID | MS_NODEV | MS_NOEXEC)
    _build_dev(root)
    if spec.termination_log:
        _bind(spec.termination_log, _make_mount_point(root, spec.termination_log_path, False), read_only=False)
    # Parents before children, so /data/cache is mounted onto the /data volume, not under it.
    image_paths = _hidden_image_paths(spec)
    for mount in sorted(spec.mounts + image_paths, key=lambda m: len([p for p in m.target.split("/") if p])):
        target = _make_mount_point(root, mount.target, os.path.isdir(mount.source))
        _bind(mount.source, target, mount.read_only)
    # Read-only only now: a volume inside one of them (storage under a checkout) needed its mount point.
    for mount in image_paths:
        _mount(None, in_root(root, mount.target), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for path in spec.open_up:
        _open_up(root, path)
    os.makedirs(in_root(root, spec.working_dir), exist_ok=True)  # as runtimes create a missing workingDir
    if spec.read_only_root:
        _mount(None, root, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    number = SYS_PIVOT_ROOT.get(platform.machine())
    os.chdir(root)
    if number is None:
        os.chroot(".")
    else:
        # pivot_root(".", ".") stacks the old root on the new one; detaching it leaves only the new.
        _check(_libc.syscall(number, b".", b"."), "pivot_root")
        _check(_libc.umount2(b".", MNT_DETACH), "detach the host's root")
    os.chdir("/")


def _exec_command(spec: SandboxSpec, error_fd: int) -> None:
    """In the container's root: become its user and replace this process by its command."""
    try:
        os.umask(0o022)
        os.setgroups(spec.groups)
        os.setgid(spec.gid)
        os.setuid(spec.uid)
        if spec.no_new_privileges:
            _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
        try:
            os.chdir(spec.working_dir)
        except OSError as error:
            raise SandboxError(f"chdir to working directory {spec.working_dir!r}: {error.strerror}") from error
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        try:
            os.execvpe(spec.command[0], spec.command, spec.env)
        except FileNotFoundError as error:
            raise SandboxError(f'exec: "{spec.command[0]}": executable file not found in $PATH') from error
        except OSError as error:
            raise SandboxError(f'exec: "{spec.command[0]}": {error.strerror}') from error
    except BaseException as error:  # noqa: BLE001 - whatever it was, the runner must hear it
        _report(error_fd, error)
        os._exit(START_FAILED)


def _report(error_fd: int, error: BaseException) -> None:
    message = str(error) if isinstance(error, SandboxError) else f"{type(error).__name__}: {error}"
    os.write(error_fd, message.encode(errors="replace"))


def _exit_as(status: int) -> None:
    """Exit as a child with wait status ``status`` did (a signal becomes 128 + its number)."""
    if os.WIFSIGNALED(status):
        os._exit(128 + os.WTERMSIG(status))
    os._exit(os.waitstatus_to_exitcode(status))


def _tie_to_parent(lifeline: int | None) -> None:
    """SIGKILL when the parent dies; if it died before this took hold, die now."""
    _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
    if lifeline is not None:
        # The parent holds the write end: EOF means it is gone (reparenting says nothing in a new PID namespace).
        os.set_blocking(lifeline, False)
        try:
            if os.read(lifeline, 1) == b"":
                os._exit(128 + signal.SIGKILL)
        except BlockingIOError:
            pass


def _init(spec: SandboxSpec, error_fd: int, lifeline: int) -> None:
    """PID 1 of the container: build its root, start its command, forward signals, reap, exit as it does."""
    try:
        _tie_to_parent(lifeline)
        build_root(spec)
    except BaseException as error:  # noqa: BLE001
        _report(error_fd, error)
        os._exit(START_FAILED)
    command = os.fork()
    if command == 0:
        _exec_command(spec, error_fd)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: os.kill(command, signum))
    while True:
        pid, status = os.wait()
        if pid == command:
            _exit_as(status)


def main() -> None:
    spec = SandboxSpec.from_json(sys.stdin.read())
    error_fd = os.open(spec.start_error, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        _check(_libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "pdeathsig")
        if os.getppid() != spec.runner_pid:  # the runner died before pdeathsig took hold
            os._exit(128 + signal.SIGKILL)
        _check(_libc.unshare(CLONE_NEWPID), "unshare the PID namespace")
        lifeline_read, lifeline_write = os.pipe()
        init = os.fork()
    except BaseException as error:  # noqa: BLE001
        _report(error_fd, error)
        os._exit(START_FAILED)
    if init == 0:
        os.close(lifeline_write)
        _init(spec, error_fd, lifeline_read)
    os.close(lifeline_read)
    for sig in FORWARDED_SIGNALS:
        signal.signal(sig, lambda signum, _frame: os.kill(init, signum))
    _, status = os.waitpid(init, 0)
    _exit_as(status)


if __name__ == "__main__":
    main()

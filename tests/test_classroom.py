"""Running a real class beyond one machine: the Zero to JupyterHub values in the repository.

The Kubernetes deployment itself is not run here (no cluster); this checks that the values file
says what the course relies on, with the types the chart expects.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
VALUES = ROOT / "nbgrader" / "z2jh-values.yaml"
QUANTITY = re.compile(r"^\d+(\.\d+)?(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")  # Kubernetes resource quantities


def z2jh_problems(values: dict) -> list[str]:
    """What is missing or malformed in a values file, for the keys this course relies on."""
    problems = []

    def get(path: str):
        node = values
        for key in path.split("."):
            if not isinstance(node, dict) or key not in node:
                problems.append(f"missing {path}")
                return None
            node = node[key]
        return node

    single = "singleuser"
    if not isinstance(get(f"{single}.image.name"), str):
        problems.append("singleuser.image.name must be the repo2docker image's name")
    if not isinstance(get(f"{single}.image.tag"), str):
        problems.append("singleuser.image.tag must be a string (quote it)")
    for key in ("cpu.limit", "cpu.guarantee", "memory.limit", "memory.guarantee"):
        value = get(f"{single}.{key}")
        if value is not None and not QUANTITY.match(str(value)):
            problems.append(f"singleuser.{key}={value!r} is not a resource quantity")
    mounts = get(f"{single}.storage.extraVolumeMounts") or []
    volumes = {v.get("name") for v in get(f"{single}.storage.extraVolumes") or []}
    exchange = [m for m in mounts if m.get("name") in volumes]
    if not exchange:
        problems.append("no volume mounted for the nbgrader exchange")
    config = (get(f"{single}.extraFiles.nbgrader-config") or {}).get("stringData", "")
    root = re.search(r'c\.Exchange\.root\s*=\s*"([^"]+)"', config)
    if not root or root.group(1) not in {m.get("mountPath") for m in exchange}:
        problems.append("c.Exchange.root must be the exchange volume's mountPath")
    if 'course_id = "qcourse"' not in config:
        problems.append("the nbgrader config must name the course qcourse")
    if get("hub.config.JupyterHub.authenticator_class") is None:
        problems.append("no authenticator")
    if get("cull.enabled") is not True:
        problems.append("idle servers must be culled")
    return problems


def test_zero_to_jupyterhub_values_hold_what_the_course_relies_on():
    values = yaml.safe_load(VALUES.read_text())
    assert z2jh_problems(values) == []


@pytest.mark.parametrize("breakage", [
    ("singleuser", "image", "tag"), ("singleuser", "memory", "limit"),
    ("singleuser", "storage", "extraVolumeMounts"), ("cull", "enabled")])
def test_the_values_check_notices_a_broken_file(breakage):
    values = yaml.safe_load(VALUES.read_text())
    node = values
    for key in breakage[:-1]:
        node = node[key]
    node[breakage[-1]] = {"tag": 2026, "limit": "two gigs", "enabled": "yes"}.get(
        breakage[-1], [])
    assert z2jh_problems(values), breakage

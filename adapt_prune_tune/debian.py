"""Debian packages as a source of real text: fetched and unpacked, never installed.

The corpora (:mod:`adapt_prune_tune.corpus`, :mod:`adapt_prune_tune.novels`) come from Debian
packages: ``apt-get download`` fetches a ``.deb`` from the Debian mirror into a directory of our
choosing and ``dpkg -x`` unpacks its files there, so nothing is installed, no root is needed
once the apt lists exist, and the text is whatever that package version holds, on every machine.
"""

import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional


def _run(command: List[str], cwd: Optional[Path] = None) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True)


def download_deb(package: str, directory: Path, version: Optional[str] = None) -> Path:
    """``apt-get download PACKAGE[=VERSION]`` into ``directory``.

    A fresh machine (or container) often has empty apt lists, so that apt cannot locate the
    package; as root, the lists are refreshed once with ``apt-get update`` and the download
    retried.

    Raises:
        RuntimeError: without apt, or if the package cannot be downloaded.
    """
    if shutil.which("apt-get") is None:
        raise RuntimeError(
            f"apt-get not found: downloading {package} needs a Debian or Ubuntu system. Pass an "
            "already downloaded .deb (`adapt-prune-tune prepare --help` names the option)."
        )
    spec = f"{package}={version}" if version else package
    command = ["apt-get", "download", spec]
    result = _run(command, cwd=directory)
    if result.returncode != 0 and os.geteuid() == 0:
        update = _run(["apt-get", "update"])
        if update.returncode == 0:
            result = _run(command, cwd=directory)
    debs = sorted(directory.glob(f"{package}_*.deb"))
    if result.returncode != 0 or not debs:
        hint = "" if os.geteuid() == 0 else " Run `sudo apt-get update` first, or"
        raise RuntimeError(
            f"`apt-get download {spec}` failed (exit code {result.returncode}); it needs "
            f"access to a Debian mirror.{hint} pass an already downloaded .deb "
            f"(`adapt-prune-tune prepare --help` names the option).\n{result.stderr.strip()}"
        )
    return debs[0]


def deb_fields(deb: Path) -> Dict[str, str]:
    """Package name and version of a .deb, read with ``dpkg-deb``.

    Raises:
        RuntimeError: without dpkg-deb.
        ValueError: if ``deb`` is not a Debian package.
    """
    if shutil.which("dpkg-deb") is None:
        raise RuntimeError(f"dpkg-deb not found: unpacking {deb} needs dpkg (Debian/Ubuntu)")
    result = _run(["dpkg-deb", "--field", str(deb), "Package", "Version"])
    if result.returncode != 0:
        raise ValueError(f"{deb} is not a Debian package: {result.stderr.strip()}")
    fields = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    return {"package": fields.get("Package", ""), "version": fields.get("Version", "")}


def unpack_deb(deb: Path, directory: Path, package: str, version: Optional[str] = None) -> None:
    """Unpack ``deb`` into ``directory`` with ``dpkg -x`` (no installation), after checking
    that it is ``package`` (at ``version``, if given).

    Raises:
        ValueError: if ``deb`` is another package or version.
        RuntimeError: if dpkg cannot unpack it.
    """
    fields = deb_fields(deb)
    if fields["package"] != package:
        raise ValueError(f"{deb} holds package {fields['package']!r}, not {package!r}")
    if version is not None and fields["version"] != version:
        raise ValueError(f"{deb} holds {package} version {fields['version']!r}, not {version!r}")
    result = _run(["dpkg", "-x", str(deb), str(directory)])
    if result.returncode != 0:
        raise RuntimeError(f"dpkg -x {deb} failed: {result.stderr.strip()}")

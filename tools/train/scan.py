"""Scan a MIMII-layout tree into clip records, and report what the files are.

MIMII's layout is ``<snr>_dB_<machine>/<machine>/id_XX/{normal,abnormal}/N.wav``.
Real MIMII has no fault types; the simulator writes them to ``metadata.csv``
at the root (columns include ``path``, ``snr_db``, ``unit``, ``split`` and
``fault``). The report plays the part of the reference service's ``WavFileHelper``: sample
rates, channel counts and bit depths, so a mixed or unexpected tree is seen
before hours are spent on it.
"""

from __future__ import annotations

import csv
import logging
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import soundfile as sf

logger = logging.getLogger(__name__)

METADATA_FILE = "metadata.csv"
CONDITIONS = ("normal", "abnormal")
_SNR_DIR = re.compile(r"^(?P<snr>-?\d+)_dB_(?P<machine>[A-Za-z0-9]+)$")
_UNIT_DIR = re.compile(r"^id_\d+$")
# Bits per sample of libsndfile's PCM subtypes (the WAV header's bit depth).
_SUBTYPE_BITS = {
    "PCM_S8": 8,
    "PCM_U8": 8,
    "PCM_16": 16,
    "PCM_24": 24,
    "PCM_32": 32,
    "FLOAT": 32,
    "DOUBLE": 64,
}


class ScanError(ValueError):
    """The tree is not a MIMII-layout tree, or its metadata disagrees with it."""


@dataclass(frozen=True)
class ClipRecord:
    """One audio file of the tree, with what its path and header say."""

    rel_path: str
    snr_db: int
    machine: str
    unit: str
    condition: str
    fault: str
    sample_rate_hz: int
    channels: int
    subtype: str
    frames: int
    # From the simulator's metadata: the share of the clip each state fills
    # (JSON, for clips that straddle a change) and the families of the
    # simulated world it was drawn from ("room=live noise=pink ...").
    fractions: str = ""
    families: str = ""

    @property
    def family(self) -> dict[str, str]:
        return dict(item.split("=", 1) for item in self.families.split())

    @property
    def bit_depth(self) -> int | None:
        return _SUBTYPE_BITS.get(self.subtype)

    @property
    def duration_s(self) -> float:
        return self.frames / self.sample_rate_hz if self.sample_rate_hz else 0.0


@dataclass(frozen=True)
class ScanReport:
    """What the reference service's WavFileHelper told about a dataset, and a bit more."""

    n_files: int
    sample_rates_hz: dict[int, int]
    channels: dict[int, int]
    bit_depths: dict[str, int]
    min_duration_s: float
    max_duration_s: float
    clips_per_group: dict[str, int]
    fault_labels: bool

    def lines(self) -> list[str]:
        """Human-readable summary lines."""
        out = [
            f"files: {self.n_files}",
            f"sample rates (Hz): {_fmt_counts(self.sample_rates_hz)}",
            f"channels: {_fmt_counts(self.channels)}",
            f"bit depths: {_fmt_counts(self.bit_depths)}",
            f"durations (s): {self.min_duration_s:.2f} .. {self.max_duration_s:.2f}",
            f"fault labels: {'from metadata.csv' if self.fault_labels else 'none (pseudo-labels)'}",
        ]
        out += [f"  {group}: {n}" for group, n in sorted(self.clips_per_group.items())]
        return out


def _fmt_counts(counts: dict[int, int] | dict[str, int]) -> str:
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items(), key=lambda kv: str(kv[0])))


def _bit_label(subtype: str) -> str:
    bits = _SUBTYPE_BITS.get(subtype)
    return f"{bits}-bit {subtype}" if bits else subtype


def _parse_path(rel: Path) -> tuple[int, str, str, str]:
    """``(snr_db, machine, unit, condition)`` from a path relative to the root."""
    parts = rel.parts
    if len(parts) != 5:
        raise ScanError(f"{rel}: expected <snr>_dB_<machine>/<machine>/id_XX/<condition>/<file>")
    snr_dir, machine, unit, condition, _ = parts
    m = _SNR_DIR.match(snr_dir)
    if m is None or m["machine"] != machine:
        raise ScanError(f"{rel}: {snr_dir!r} is not '<snr>_dB_{machine}'")
    if not _UNIT_DIR.match(unit):
        raise ScanError(f"{rel}: {unit!r} is not a unit directory (id_XX)")
    if condition not in CONDITIONS:
        raise ScanError(f"{rel}: {condition!r} is neither 'normal' nor 'abnormal'")
    return int(m["snr"]), machine, unit, condition


def _read_fault_metadata(root: Path) -> dict[str, dict[str, str]] | None:
    """``rel_path -> row`` from ``metadata.csv``, or None without one."""
    path = root / METADATA_FILE
    if not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = {"path", "fault"} - set(reader.fieldnames or ())
        if missing:
            raise ScanError(f"{path}: missing columns {sorted(missing)}")
        return {Path(row["path"]).as_posix(): row for row in reader}


def _fault_of(condition: str, rel: str, rows: dict[str, dict[str, str]] | None, meta: Path) -> str:
    if condition == "normal":
        return "normal"
    if rows is None:
        return ""
    row = rows.get(rel)
    if row is None:
        raise ScanError(f"{meta}: no row for {rel}")
    fault = row["fault"].strip()
    if not fault or fault == "normal":
        raise ScanError(f"{meta}: abnormal clip {rel} has fault {fault!r}")
    return fault


def _extras(rel: str, rows: dict[str, dict[str, str]] | None) -> tuple[str, str]:
    """``(fractions, families)`` of a clip from the simulator's metadata ("" without)."""
    row = (rows or {}).get(rel, {})
    families = " ".join(
        f"{k.removeprefix('family_')}={v}"
        for k, v in sorted(row.items())
        if k.startswith("family_")
    )
    return row.get("fractions", ""), families


def scan_tree(root: Path) -> list[ClipRecord]:
    """All WAV files of a MIMII-layout tree, sorted by path.

    Abnormal clips get their fault type from ``metadata.csv`` when the tree
    has one, and an empty fault otherwise (real MIMII).
    """
    if not root.is_dir():
        raise ScanError(f"{root}: not a directory")
    faults = _read_fault_metadata(root)
    records = []
    # Everything under the SNR directories, so a stray file is reported, not skipped.
    for path in sorted(root.glob("*_dB_*/**/*.wav")):
        rel = path.relative_to(root)
        snr_db, machine, unit, condition = _parse_path(rel)
        try:
            info = sf.info(str(path))
        except (sf.LibsndfileError, RuntimeError) as e:
            raise ScanError(f"{path}: unreadable WAV ({e})") from e
        rel_posix = rel.as_posix()
        fractions, families = _extras(rel_posix, faults)
        records.append(
            ClipRecord(
                rel_path=rel_posix,
                snr_db=snr_db,
                machine=machine,
                unit=unit,
                condition=condition,
                fault=_fault_of(condition, rel_posix, faults, root / METADATA_FILE),
                sample_rate_hz=int(info.samplerate),
                channels=int(info.channels),
                subtype=str(info.subtype),
                frames=int(info.frames),
                fractions=fractions,
                families=families,
            )
        )
    if not records:
        raise ScanError(f"{root}: no WAV files in the MIMII layout")
    logger.info("scanned %d clips under %s", len(records), root)
    return records


def has_fault_labels(records: Sequence[ClipRecord]) -> bool:
    """True when every abnormal clip has a fault type."""
    return all(r.fault for r in records)


def report(records: Sequence[ClipRecord]) -> ScanReport:
    """Summarise the headers and the grouping of a scan."""
    durations = [r.duration_s for r in records]
    groups = Counter(f"{r.snr_db:+d} dB {r.unit} {r.fault or r.condition}" for r in records)
    return ScanReport(
        n_files=len(records),
        sample_rates_hz=dict(Counter(r.sample_rate_hz for r in records)),
        channels=dict(Counter(r.channels for r in records)),
        bit_depths=dict(Counter(_bit_label(r.subtype) for r in records)),
        min_duration_s=min(durations),
        max_duration_s=max(durations),
        clips_per_group=dict(groups),
        fault_labels=has_fault_labels(records),
    )


_FIELDS = [f.name for f in fields(ClipRecord)]
_INT_FIELDS = {"snr_db", "sample_rate_hz", "channels", "frames"}


def write_records(records: Iterable[ClipRecord], path: Path) -> None:
    """Write a scan to CSV (one row per clip)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=_FIELDS)
        writer.writeheader()
        for r in records:
            writer.writerow(asdict(r))


def read_records(path: Path) -> list[ClipRecord]:
    """Read a scan written by :func:`write_records`."""
    with path.open(newline="", encoding="utf-8") as f:
        return [
            ClipRecord(**{k: int(v) if k in _INT_FIELDS else v for k, v in row.items()})  # type: ignore[arg-type]
            for row in csv.DictReader(f)
        ]

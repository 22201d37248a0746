"""What the ``gradnoise`` command reads and writes: runs from a CSV, scalars from TensorBoard event
files, output paths. Every problem with a user's file is a :class:`UsageError` with one line that
says what is wrong, never a traceback."""

from __future__ import annotations

import csv
import glob
import math
import os
import struct
from typing import Optional

__all__ = ["UsageError", "check_output_path", "damaged_records", "read_runs", "read_tensorboard_scalars"]


class UsageError(Exception):
    """A mistake in the command line or in a file it names: printed as one line, exit status 2."""


def check_output_path(option: str, path: Optional[str]) -> None:
    """Refuse an output file whose folder is missing or not writable, before any work is done."""
    if path is None:
        return
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory; give a file name, e.g. {os.path.join(path, 'out.png')}")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: {folder} is not a folder")
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{option} {path}: the folder {folder} is not writable")


def _open_text(path: str):
    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory, expected a CSV file")
    with open(path, "rb") as f:
        head = f.read(4096)
    if b"\x00" in head:
        raise UsageError(f"{path}: is not a text CSV file (it holds binary data)")
    try:
        return open(path, newline="", encoding="utf-8-sig")
    except OSError as e:
        raise UsageError(f"{path}: cannot be read ({e.strerror})") from None


def _cell(path: str, line: int, column: str, text: Optional[str], positive: bool = True) -> float:
    if text is None or not text.strip():
        raise UsageError(f"{path}, line {line}: the {column!r} cell is empty")
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{path}, line {line}: {column}={text.strip()!r} is not a number") from None
    if not math.isfinite(value) or (positive and value <= 0):
        raise UsageError(f"{path}, line {line}: {column}={text.strip()} is invalid: expected a finite number > 0")
    return value


def read_runs(path: str) -> dict[str, list[float]]:
    """Columns ``steps`` and ``batch_size`` or ``examples`` (optional ``lr``) of a CSV of runs."""
    with _open_text(path) as f:
        try:
            rows = list(csv.DictReader(f))
        except (csv.Error, UnicodeDecodeError) as e:
            raise UsageError(f"{path}: is not a readable CSV file ({e})") from None
    if not rows:
        raise UsageError(f"{path}: no rows (expected a header line and one line per run)")
    cols = {k.strip().lower(): k for k in rows[0] if k is not None}
    if "steps" not in cols or not ({"batch_size", "examples"} & set(cols)):
        raise UsageError(f"{path}: needs columns 'steps' and 'batch_size' (or 'examples'); found {list(cols)}")
    out: dict[str, list[float]] = {name: [] for name in ("steps", "batch_size", "examples", "lr") if name in cols}
    for line, row in enumerate(rows, start=2):
        for name in out:
            out[name].append(_cell(path, line, name, row.get(cols[name])))
    if "examples" not in out:
        out["examples"] = [s * b for s, b in zip(out["steps"], out["batch_size"])]
    if "batch_size" not in out:
        out["batch_size"] = [e / s for e, s in zip(out["examples"], out["steps"])]
    return out


def damaged_records(path: str) -> Optional[str]:
    """Where a TensorBoard event file stops being readable, or ``None`` if every record is whole.

    An event file is a sequence of records: an 8-byte length, its 4-byte masked CRC-32C, the
    data, the data's masked CRC-32C. TensorBoard's reader stops quietly at the first bad record;
    this walks the same framing to say so."""
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        offset = 0
        while offset < size:
            header = f.read(12)
            if len(header) < 12:
                return f"a truncated record at byte {offset} of {size}"
            (length,) = struct.unpack("<Q", header[:8])
            (crc,) = struct.unpack("<I", header[8:])
            if masked_crc32c(header[:8]) != crc or offset + 16 + length > size:
                return f"a corrupt record at byte {offset} of {size}"
            data, footer = f.read(length), f.read(4)
            if masked_crc32c(data) != struct.unpack("<I", footer)[0]:
                return f"a corrupt record at byte {offset} of {size}"
            offset += 16 + length
    return None


def read_tensorboard_scalars(logdir: str, warn=None) -> dict[str, list[tuple[int, float]]]:
    """Every ``gradnoise/*`` scalar of the newest event file under ``logdir``: key -> [(step, value)].

    Raises :class:`UsageError` if there is no such file; a damaged one is read up to the damage
    and ``warn`` (a callable taking one line) is told where it stops."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not os.path.isdir(logdir):
        raise UsageError(f"{logdir}: no such directory (give the TensorBoard log directory of a run)")
    files = sorted(glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True), key=os.path.getmtime)
    if not files:
        raise UsageError(f"no TensorBoard event files under {logdir}")
    damage = damaged_records(files[-1])
    if damage is not None and warn is not None:
        warn(f"{files[-1]}: the event file is damaged ({damage}); only the records before it are read")
    acc = EventAccumulator(os.path.dirname(files[-1]), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"] if tag.startswith("gradnoise/")}

"""Read MXNet / insightface RecordIO (`train.rec` + `train.idx`) without MXNet.

Format (dmlc-core recordio + mxnet.recordio, re-implemented from the format description):

* `.idx`: text lines `key<TAB>offset`, the byte offset of record `key` in `.rec`.
* `.rec`: records, each `uint32 magic 0xced7230a`, `uint32 lrecord`, payload, zero padding to a
  multiple of 4 bytes. `lrecord` holds a continuation flag in its upper 3 bits and the part length
  in its lower 29. Flag 0 is a whole record; a payload that contains the magic word at a 4-byte
  aligned position was written as parts (flag 1 first, 2 middle, 3 last) split at those
  positions, the magic word itself dropped: reassembly puts it back between the parts.
* payload: `IRHeader` = struct `<IfQQ` (flag uint32, label float32, id uint64, id2 uint64). When
  flag > 0, `flag` float32 labels follow (the header's own label field is then unused), then the
  encoded image bytes.

insightface writes two layouts. "header": record 0 has flag > 0, no image, and labels
[first_identity_record, end_identity_records]: the images are keys 1 .. label[0]-1 and the records
after them describe identity ranges (not images). "plain": every key is an image. The label of an
image is the float label, or the first element of the label array.
"""
import math
import os
import struct
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

__all__ = ["RecordIOError", "UnindexedRecords", "IRHeader", "RecordIOFile", "unpack_record",
           "read_index", "RECORDIO_MAGIC"]

RECORDIO_MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", RECORDIO_MAGIC)
_LEN_MASK = (1 << 29) - 1
_IR_FORMAT = struct.Struct("<IfQQ")  # flag, label, id, id2: 24 bytes


class RecordIOError(ValueError):
    """A RecordIO file that does not follow the format; the message names file, key and offset."""


class UnindexedRecords(RecordIOError):
    """A record ends before the next one its .idx points to: records in between have no .idx
    line (the .idx was cut short, or lost lines)."""


@dataclass(frozen=True)
class IRHeader:
    flag: int
    label: Tuple[float, ...]  # one value when flag == 0, else `flag` values
    id: int
    id2: int


def unpack_record(payload: bytes) -> Tuple[IRHeader, bytes]:
    """Split a record payload into its IRHeader (labels as a tuple) and the image bytes."""
    if len(payload) < _IR_FORMAT.size:
        raise RecordIOError(f"record payload of {len(payload)} bytes is shorter than the "
                            f"{_IR_FORMAT.size}-byte IRHeader")
    flag, label, id1, id2 = _IR_FORMAT.unpack_from(payload)
    body = _IR_FORMAT.size
    if flag > 0:
        end = body + 4 * flag
        if end > len(payload):
            raise RecordIOError(f"IRHeader flag {flag} announces {flag} float32 labels but the "
                                f"payload has {len(payload) - body} bytes after the header")
        labels = tuple(float(v) for v in np.frombuffer(payload, "<f4", flag, body))
        body = end
    else:
        labels = (float(label),)
    return IRHeader(flag, labels, id1, id2), payload[body:]


def read_index(idx_path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Parse `.idx` into (keys, offsets) int64 arrays sorted by key.

    Cost: the text is parsed by numpy in C, ~16 bytes of memory per record afterwards (42M records:
    ~0.7 GB); Python objects per line would need ~10x that.
    """
    with open(idx_path, "rb") as f:
        text = f.read()
    text = text.strip()
    lines = text.count(b"\n") + 1 if text else 0
    with warnings.catch_warnings():
        # numpy stops at the first unparsable field with a DeprecationWarning (older) or a
        # ValueError (newer); the count check below reports where
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            values = np.fromstring(text.decode("ascii", "replace"), dtype=np.int64, sep=" ")
        except ValueError:
            values = _parse_prefix(text)
    if values.size != 2 * lines:
        raise RecordIOError(f"{idx_path}: expected {lines} lines of `key<TAB>offset` integers, "
                            f"could parse only the first {values.size // 2}")
    pairs = values.reshape(-1, 2)
    order = np.argsort(pairs[:, 0], kind="stable")
    keys, offsets = pairs[order, 0], pairs[order, 1]
    if keys.size and np.any(keys[1:] == keys[:-1]):
        dup = int(keys[1:][keys[1:] == keys[:-1]][0])
        raise RecordIOError(f"{idx_path}: key {dup} appears more than once")
    return keys, offsets


def _parse_prefix(text: bytes) -> np.ndarray:
    """The integers before the first field that is not one (slow path, error reports only)."""
    out = []
    for field in text.split():
        try:
            out.append(int(field))
        except ValueError:
            break
    return np.array(out[:len(out) // 2 * 2], dtype=np.int64)


class RecordIOFile:
    """Random access to the records of one `.rec` file by byte offset.

    The file is opened lazily, so an instance can be pickled into worker processes (each opens
    its own handle). Reads within one shard are in offset order, so the 1 MiB buffer turns them
    into sequential I/O.
    """

    def __init__(self, rec_path: str):
        self.path = rec_path
        self._f = None
        self._pid = None

    def __getstate__(self):
        return {"path": self.path, "_f": None, "_pid": None}

    def _file(self):
        if self._f is None or self._pid != os.getpid():
            self._f = open(self.path, "rb", buffering=1 << 20)
            self._pid = os.getpid()
        return self._f

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def read_at(self, offset: int, key: Optional[int] = None, end: Optional[int] = None
                ) -> bytes:
        """The reassembled payload of the record starting at `offset`. end: where the next
        indexed record starts (or the file's size, after the last one); a record that ends
        anywhere else means records in between that no .idx line points to (an .idx cut short,
        or missing lines): RecordIOError."""
        f = self._file()
        f.seek(offset)
        parts = []
        while True:
            head = f.read(8)
            where = f"{self.path}: record key {key} at offset {offset}"
            if len(head) < 8:
                raise RecordIOError(f"{where}: file ends inside a record header")
            magic, lrec = struct.unpack("<II", head)
            if magic != RECORDIO_MAGIC:
                raise RecordIOError(f"{where}: magic 0x{magic:08x}, expected "
                                    f"0x{RECORDIO_MAGIC:08x} (does the .idx belong to this .rec?)")
            cflag, length = lrec >> 29, lrec & _LEN_MASK
            if cflag not in (0, 1, 2, 3) or (not parts and cflag in (2, 3)):
                raise RecordIOError(f"{where}: continuation flag {cflag} out of sequence")
            data = f.read((length + 3) & ~3)
            if len(data) < length:
                raise RecordIOError(f"{where}: file ends inside a record of {length} bytes")
            parts.append(data[:length])
            if cflag in (0, 3):
                if end is not None and f.tell() != end:
                    raise UnindexedRecords(
                        f"{where}: the record ends at byte {f.tell()}, but the next indexed "
                        f"record (or the file's end) is at byte {end}: {end - f.tell()} bytes of "
                        "records in between are in no .idx line")
                return _MAGIC_BYTES.join(parts)

    def read_image(self, offset: int, key: Optional[int] = None, end: Optional[int] = None
                   ) -> Tuple[int, bytes]:
        """(label, image bytes) of the image record at `offset`; the label must be an integer.
        end: see read_at."""
        payload = self.read_at(offset, key, end)  # its errors name the file, key and offset
        try:
            header, image = unpack_record(payload)
        except RecordIOError as e:
            raise RecordIOError(f"{self.path}: record key {key}: {e}") from None
        return label_to_int(header.label[0], f"{self.path}: record key {key}"), image


def label_to_int(value, where: str) -> int:
    """A label as a non-negative int64; `where` names the sample in the error."""
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: label {value!r} is not a number") from None
    if not math.isfinite(f) or f != int(f) or f < 0 or f >= 2 ** 63:
        raise ValueError(f"{where}: label {value!r} is not a non-negative int64 integer")
    return int(f)

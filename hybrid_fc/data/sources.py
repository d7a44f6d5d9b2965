"""Sample sources for the shard writer: insightface RecordIO, an image folder, a list file.

Every source enumerates its samples in one deterministic order (index 0 .. num_samples-1), which
is what makes the conversion resumable: shard i always holds the same indices. The main
process only plans (counts, labels where they are cheap); `iter_indices` runs in the writer's
worker processes and streams one sample at a time.
"""
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np

from .recordio import (RecordIOError, RecordIOFile, UnindexedRecords, label_to_int, read_index,
                       unpack_record)

__all__ = ["Source", "RecordIOSource", "FolderSource", "ListSource", "open_source",
           "SourceError", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class SourceError(ValueError):
    """Bad input to the converter; the message names the file, line or record."""


class Source:
    """Base class: `num_samples`, `iter_indices` (in workers), a fingerprint for resume checks."""

    kind = "?"
    num_samples: int = 0
    known_num_classes: Optional[int] = None  # when the source defines it up front (folders)

    def fingerprint(self) -> dict:
        """What identifies this source; a resumed conversion must see the same values."""
        raise NotImplementedError

    def mean_sample_bytes(self) -> float:
        """Estimate of the encoded image size, for sizing shards."""
        raise NotImplementedError

    def iter_indices(self, indices: np.ndarray) -> Iterator[Tuple[int, bytes, int]]:
        """(index, image bytes, label) for the given increasing indices, in that order."""
        raise NotImplementedError

    def extra_files(self) -> dict:
        """Small text files to write next to the manifest (name -> content)."""
        return {}

    def left_out(self) -> List[dict]:
        """Files under the source that are not samples: [{"path", "why"}] (listed in the
        manifest, never dropped silently)."""
        return []


def _stat_mean(paths: List[str]) -> float:
    sizes = [os.path.getsize(p) for p in paths]
    return float(np.mean(sizes)) if sizes else 1.0


def _evenly(n: int, k: int = 1000) -> List[int]:
    return sorted(set(np.linspace(0, max(n - 1, 0), min(n, k)).astype(np.int64).tolist()))


class RecordIOSource(Source):
    """insightface `train.rec` + `train.idx`, either layout (see recordio.py)."""

    kind = "recordio"

    def __init__(self, directory: str, rec_name: str = "train.rec", idx_name: str = "train.idx"):
        self.rec_path = os.path.join(directory, rec_name)
        self.idx_path = os.path.join(directory, idx_name)
        for p in (self.rec_path, self.idx_path):
            if not os.path.isfile(p):
                raise SourceError(f"RecordIO source {directory!r}: {p} does not exist")
        try:
            keys, offsets = read_index(self.idx_path)
        except RecordIOError as e:
            raise SourceError(str(e)) from None
        if not keys.size:
            raise SourceError(f"{self.idx_path} has no `key<TAB>offset` lines")
        rec = RecordIOFile(self.rec_path)
        self.layout, image_keys = "plain", keys
        if keys.size and keys[0] == 0:
            try:
                header, image = unpack_record(rec.read_at(int(offsets[0]), 0))
            except RecordIOError as e:
                raise SourceError(f"{self.rec_path}: record key 0: {e}") from None
            # insightface's rule is "flag > 0 at key 0"; an empty image part makes it certain
            # that record 0 is the header and not an image with an array label.
            if header.flag > 0 and len(image) == 0:
                first_id = int(header.label[0])
                self.layout = "header"
                image_keys = np.arange(1, first_id, dtype=np.int64)
                pos = np.searchsorted(keys, image_keys)
                missing = (pos >= keys.size) | (keys[np.minimum(pos, keys.size - 1)] != image_keys)
                if missing.any():
                    raise SourceError(f"{self.idx_path}: header record 0 says images are keys 1.."
                                      f"{first_id - 1}, but key {int(image_keys[missing][0])} is "
                                      f"not in the index")
                if header.flag > 1 and int(header.label[1]) > first_id:
                    self.known_num_classes = int(header.label[1]) - first_id
        rec.close()
        self.rec = rec
        rec_bytes = os.path.getsize(self.rec_path)
        past = offsets >= rec_bytes
        if past.any():
            k = int(np.argmax(past))
            raise SourceError(f"{self.idx_path}: key {int(keys[k])} starts at byte "
                              f"{int(offsets[k])}, but {self.rec_path} has only {rec_bytes} bytes "
                              f"({int(past.sum())} of {keys.size} records lie past its end): the "
                              ".rec is truncated (an interrupted copy?) or the .idx belongs to "
                              "another .rec")
        # The record that starts last must end where the file ends: an .idx cut at a line
        # boundary (an interrupted copy) parses cleanly and would convert half the dataset.
        last = int(np.argmax(offsets))
        try:
            rec.read_at(int(offsets[last]), int(keys[last]), end=rec_bytes)
        except RecordIOError as e:
            raise SourceError(_unindexed(e, self.idx_path)) from None
        finally:
            rec.close()
        pos = np.searchsorted(keys, image_keys)
        self.keys = image_keys
        self.offsets = offsets[pos]
        # where each image record's successor starts (every indexed record, then the file's end):
        # its size for shard planning, and where the record must end (RecordIOFile.read_at)
        all_sorted = np.sort(np.append(offsets, rec_bytes))
        self._next = all_sorted[np.searchsorted(all_sorted, self.offsets, side="right")]
        self._sizes = self._next - self.offsets
        self.num_samples = int(image_keys.size)

    def fingerprint(self):
        return {"kind": self.kind, "path": os.path.abspath(self.rec_path), "layout": self.layout,
                "num_samples": self.num_samples, "rec_bytes": os.path.getsize(self.rec_path)}

    def mean_sample_bytes(self):
        return float(self._sizes.mean()) if self.num_samples else 1.0

    def iter_indices(self, indices):
        for i in indices.tolist():
            key = int(self.keys[i])
            try:
                label, image = self.rec.read_image(int(self.offsets[i]), key,
                                                   int(self._next[i]))
            except ValueError as e:
                raise SourceError(_unindexed(e, self.idx_path)) from None
            yield i, image, label


def _unindexed(error: ValueError, idx_path: str) -> str:
    """A RecordIO read error's message; records the .idx does not point to are its fault, so
    it is named, with what to do."""
    if isinstance(error, UnindexedRecords):
        return (f"{idx_path} does not index every record: {error}. The .idx was cut short or "
                "lost lines (an interrupted copy?): copy it again, or rebuild it from the .rec")
    return str(error)


class FolderSource(Source):
    """`root/<identity>/<image>`: label = position of the identity folder in sorted name order.

    The main process lists only the identity folders and counts their images; each worker
    re-lists just the folders its shard touches (same sort), so memory stays O(identities),
    not O(images). A folder that changes during the conversion is an error.
    """

    kind = "folder"

    def __init__(self, root: str):
        if not os.path.isdir(root):
            raise SourceError(f"image folder {root!r} does not exist")
        self.root = root
        self.classes, self._left_out = [], []
        for e in sorted(os.scandir(root), key=lambda e: e.name):
            if e.is_dir():
                self.classes.append(e.name)
            else:
                self._left_out.append({"path": e.path, "why": _why_not_image(e, top=True)})
        if not self.classes:
            raise SourceError(f"image folder {root!r} has no identity sub-folders")
        counts = []
        for c in self.classes:
            images, others = self._scan(c)
            counts.append(len(images))
            self._left_out += others
        counts = np.array(counts, dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(counts)])  # first index of each class
        self.num_samples = int(self.starts[-1])
        self.known_num_classes = len(self.classes)
        if self.num_samples == 0:
            raise SourceError(f"image folder {root!r} has no {'/'.join(IMAGE_EXTENSIONS)} images")

    def _scan(self, cls: str) -> Tuple[List[str], List[dict]]:
        """(sorted image file names of one identity folder, [{"path", "why"}] of the rest)."""
        images, others = [], []
        for e in os.scandir(os.path.join(self.root, cls)):
            if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS):
                images.append(e.name)
            else:
                others.append({"path": e.path, "why": _why_not_image(e)})
        return sorted(images), sorted(others, key=lambda d: d["path"])

    def _list(self, cls: str) -> List[str]:
        return self._scan(cls)[0]

    def left_out(self):
        return list(self._left_out)

    def fingerprint(self):
        return {"kind": self.kind, "path": os.path.abspath(self.root),
                "num_samples": self.num_samples, "num_classes": len(self.classes)}

    def mean_sample_bytes(self):
        picks = _evenly(self.num_samples)
        paths = []
        for i in picks:
            c = int(np.searchsorted(self.starts, i, side="right")) - 1
            names = self._list(self.classes[c])
            paths.append(os.path.join(self.root, self.classes[c], names[i - self.starts[c]]))
        return _stat_mean(paths)

    def iter_indices(self, indices):
        c, names = -1, []
        for i in indices.tolist():
            if c < 0 or not self.starts[c] <= i < self.starts[c + 1]:
                c = int(np.searchsorted(self.starts, i, side="right")) - 1
                names = self._list(self.classes[c])
                expected = int(self.starts[c + 1] - self.starts[c])
                if len(names) != expected:
                    raise SourceError(f"{os.path.join(self.root, self.classes[c])}: held "
                                      f"{expected} images when the conversion was planned, now "
                                      f"{len(names)}")
            path = os.path.join(self.root, self.classes[c], names[i - int(self.starts[c])])
            yield i, _read_file(path), c

    def extra_files(self):
        return {"classes.txt": "".join(f"{c}\n" for c in self.classes)}


class ListSource(Source):
    """A text file of `path label` lines (path relative to the list file, or absolute).

    The path is everything before the last whitespace, so paths may contain spaces. The main
    process validates every label and keeps only each line's byte offset (8 bytes per sample).
    """

    kind = "list"

    def __init__(self, list_path: str):
        if not os.path.isfile(list_path):
            raise SourceError(f"list file {list_path!r} does not exist")
        self.list_path = list_path
        self.base = os.path.dirname(os.path.abspath(list_path))
        offsets, max_label, pos = [], -1, 0
        with open(list_path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                line = raw.strip()
                if line and not line.startswith(b"#"):
                    parts = line.rsplit(None, 1)
                    where = f"{list_path}:{lineno}"
                    if len(parts) != 2:
                        raise SourceError(f"{where}: expected `path label`, got {line[:200]!r}")
                    try:
                        label = label_to_int(parts[1].decode(), where)
                    except ValueError as e:
                        raise SourceError(str(e)) from None
                    max_label = max(max_label, label)
                    offsets.append(pos)
                pos += len(raw)
        if not offsets:
            raise SourceError(f"list file {list_path!r} has no `path label` lines")
        self.offsets = np.array(offsets, dtype=np.int64)
        self.num_samples = len(offsets)
        self.known_num_classes = max_label + 1

    def _resolve(self, path: str) -> str:
        return path if os.path.isabs(path) else os.path.join(self.base, path)

    def fingerprint(self):
        return {"kind": self.kind, "path": os.path.abspath(self.list_path),
                "num_samples": self.num_samples, "list_bytes": os.path.getsize(self.list_path)}

    def _lines(self, indices):
        with open(self.list_path, "rb") as f:
            for i in indices:
                f.seek(int(self.offsets[i]))  # increasing offsets: a forward scan, buffered
                path, label = f.readline().strip().rsplit(None, 1)
                yield i, path.decode(), int(label)

    def mean_sample_bytes(self):
        paths = []
        for i in _evenly(self.num_samples):
            paths.extend(self._resolve(p) for _, p, _ in self._lines([i]))
        try:
            return _stat_mean(paths)
        except OSError as e:
            raise SourceError(f"{self.list_path}: {e}") from None

    def iter_indices(self, indices):
        for i, path, label in self._lines(indices.tolist()):
            yield i, _read_file(self._resolve(path), f"{self.list_path} sample {i}"), label


def _why_not_image(entry: os.DirEntry, top: bool = False) -> str:
    """Why a folder entry is not taken as a sample."""
    if entry.is_symlink() and not os.path.exists(entry.path):
        return "dangling symbolic link"
    if top:
        return "not an identity folder (files directly under the root are not samples)"
    if entry.is_dir():
        return "a folder inside an identity folder (not searched)"
    if not entry.is_file():
        return "not a regular file"
    return f"extension is not one of {'/'.join(IMAGE_EXTENSIONS)}"


def _read_file(path: str, where: str = "") -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise SourceError(f"{where + ': ' if where else ''}cannot read image {path!r}: "
                          f"{e.strerror or e}") from None


def open_source(path: str) -> Source:
    """The source at `path`: a directory with train.rec + train.idx (RecordIO), another
    directory (image folder), or a file (list of `path label` lines)."""
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} does not exist")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "train.rec")):
            return RecordIOSource(path)
        return FolderSource(path)
    if path.endswith(".rec"):
        d, name = os.path.split(path)
        return RecordIOSource(d or ".", name, name[:-4] + ".idx")
    return ListSource(path)


"""Embedding extraction: a folder of images or WebDataset shards -> `.npy` + keys, the input of
search / re-ID indexing.

Output, for `out = emb.npy`:
  emb.npy          float32 (N, D), L2-normalized embeddings (flip TTA by default, as in
                   hybrid_fc.evaluation), row i belongs to key i
  emb.keys.txt     N lines: the image's path relative to the folder, or the shard sample key
  emb.labels.npy   int64 (N,) class labels, for shards whose samples carry a `.cls` member
                   (-1 where one is missing)

Order: folder files sorted by relative path; shards in manifest order, samples in archive order.
Distribution: the file list (folder) or the shard list (shards) is split into contiguous blocks
over the ranks of `group`; each rank streams its block into a part file of its own (constant
memory: one batch at a time), then rank 0 concatenates the parts in rank order, which is the
global order above. The folder holding `out` must be visible to every rank (shared filesystem).
"""
import contextlib
import json
import os
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..common import split_span

__all__ = ["IMAGE_EXTENSIONS", "list_folder", "check_source", "iter_shard_samples",
           "extract_embeddings"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_folder(root: str) -> List[Tuple[str, str]]:
    """(key = path relative to root with '/' separators, full path) of every image, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    items = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in filenames:
            if fn.lower().endswith(IMAGE_EXTENSIONS):
                full = os.path.join(dirpath, fn)
                items.append((os.path.relpath(full, root).replace(os.sep, "/"), full))
    items.sort()
    if not items:
        raise FileNotFoundError(f"image folder {root!r} holds no {'/'.join(IMAGE_EXTENSIONS)} "
                                "files")
    return items


def check_source(source: Union[str, Sequence[str]]) -> None:
    """FileNotFoundError when `source` names a local path that does not exist. Called before a
    model is loaded (launch/extract.py), so a mistyped --images costs no checkpoint read and
    says what it is instead of "no manifest"."""
    if isinstance(source, str) and "://" not in source and not source.startswith("pipe:") \
            and "{" not in source and not os.path.exists(source):
        raise FileNotFoundError(f"{source} does not exist (expected an image folder, or shards: "
                                "the folder or manifest.json data/make_shards.py wrote, or a "
                                "brace pattern)")


_IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp")


def iter_shard_samples(url: str) -> Iterator[Tuple[str, bytes, int]]:
    """(key, encoded image, label or -1) of each sample of one tar shard, in archive order.

    ShardError naming the shard and the key for anything that would silently drop or repeat a
    row: a sample without exactly one image member, two members of one kind under a key (two
    samples merged into one), a key seen earlier in the shard, a label that is not an integer,
    a tar that ends early."""
    from hybrid_fc.data import ShardError
    from hybrid_fc.data.storage import open_read
    from hybrid_fc.data.tario import TarError, iter_tar
    seen = set()

    def sample(key: str, members: dict) -> Tuple[str, bytes, int]:
        if key in seen:
            raise ShardError(f"shard {url}: key {key} appears twice (two samples with one key)")
        seen.add(key)
        images = [e for e in _IMAGE_MEMBERS if e in members]
        if len(images) != 1:
            raise ShardError(f"shard {url}: sample {key} has {len(images)} image members "
                             f"(members: {sorted(members)}); each sample needs exactly one of "
                             f"{'/'.join(_IMAGE_MEMBERS)}")
        label = -1
        if "cls" in members:
            try:
                label = int(members["cls"].decode().strip())
            except (UnicodeDecodeError, ValueError):
                raise ShardError(f"shard {url}: sample {key}: label {members['cls'][:20]!r} is "
                                 "not an integer") from None
        return key, members[images[0]], label

    key, members = None, {}
    try:
        with open_read(url) as stream:
            for name, data in iter_tar(stream):
                base = os.path.basename(name)
                k, _, ext = base.partition(".")
                k, ext = name[:len(name) - len(base)] + k, ext.lower()
                if k != key:
                    if key is not None:
                        yield sample(key, members)
                    key, members = k, {}
                if ext in members:
                    raise ShardError(f"shard {url}: key {k} has two .{ext} members (two samples "
                                     "merged under one key)")
                members[ext] = data
    except TarError as e:
        raise ShardError(f"shard {url}: {e}") from None
    if key is not None:
        yield sample(key, members)


def _rank_items(source: Union[str, Sequence[str]], rank: int, world: int):
    """This rank's contiguous block of the input, as an iterator of (key, bytes, label, shard
    URL or None for a folder). A shard that holds another number of samples than its manifest
    says is a ShardError (a short shard would otherwise give fewer rows with rc 0)."""
    if isinstance(source, str) and os.path.isdir(source) and \
            not os.path.isfile(os.path.join(source, "manifest.json")):
        files = list_folder(source)
        lo, hi = split_span(len(files), rank, world)

        def folder_items():
            for key, full in files[lo:hi]:
                with open(full, "rb") as f:
                    yield key, f.read(), -1, None
        return folder_items()
    from hybrid_fc.data import ShardError, load_manifest
    m = load_manifest(source)
    counts = m.counts or [None] * len(m.urls)
    lo, hi = split_span(len(m.urls), rank, world)

    def shard_items():
        for url, expected in zip(m.urls[lo:hi], counts[lo:hi]):
            n = 0
            for key, image, label in iter_shard_samples(url):
                n += 1
                yield key, image, label, url
            if expected is not None and n != expected:
                raise ShardError(f"shard {url} holds {n} samples but the manifest says "
                                 f"{expected}: the shard is damaged or the manifest is another "
                                 "conversion's; convert again (data/make_shards.py)")
    return shard_items()


def _repeated_key(keys_path: str, spans: List[Tuple[str, int]]) -> Optional[str]:
    """The error message for the first key that two rows of keys_path share, naming both
    shards (spans: (shard URL, rows) in row order); None when every key is unique.
    Cost: one pass over the file and 8 bytes per row (a hash); keys themselves are compared
    only where two hashes agree (a second pass, only then)."""
    with open(keys_path) as f:
        hashes = np.fromiter((hash(line) for line in f), np.int64)
    order = np.argsort(hashes, kind="stable")
    pairs = [(int(order[i]), int(order[i + 1]))
             for i in np.flatnonzero(hashes[order][1:] == hashes[order][:-1])]
    if not pairs:
        return None
    wanted = {r for pair in pairs for r in pair}
    with open(keys_path) as f:
        lines = {r: line.rstrip("\n") for r, line in enumerate(f) if r in wanted}
    bounds = np.cumsum([n for _, n in spans])
    for a, b in sorted(pairs):
        if lines[a] == lines[b]:
            shard_a, shard_b = (spans[int(np.searchsorted(bounds, r, side="right"))][0]
                                for r in (a, b))
            return (f"key {lines[a]} appears twice, in shard {shard_a} and in shard {shard_b} "
                    "(two samples with one key: the embeddings' rows could not be told apart)")
    return None


def _concatenate(stem: str, out: str, meta: List[List[int]], spans: List[Tuple[str, int]]
                 ) -> None:
    """Rank 0: the ranks' part files -> out, its keys and labels, in rank order (written under
    temporary names, renamed when complete: a failure leaves no partial result)."""
    from hybrid_fc.data import ShardError
    total = sum(n for n, _ in meta)
    dims = {d for n, d in meta if n}
    if len(dims) != 1:
        raise RuntimeError(f"ranks disagree on the embedding width: {sorted(dims)}")
    (D,) = dims
    tmp_npy, tmp_keys = out + ".tmp.npy", stem + ".keys.txt.tmp"
    try:
        emb = np.lib.format.open_memmap(tmp_npy, mode="w+", dtype=np.float32, shape=(total, D))
        labels = np.empty(total, np.int64)
        row = 0
        with open(tmp_keys, "w") as keys:
            for r, (n, _) in enumerate(meta):
                p = f"{stem}.part{r:05d}"
                if n:
                    emb[row:row + n] = np.fromfile(p + ".f32", np.float32).reshape(n, D)
                    labels[row:row + n] = np.fromfile(p + ".labels", np.int64)
                    with open(p + ".keys") as fk:
                        keys.write(fk.read())
                row += n
        emb.flush()
        del emb
        repeated = _repeated_key(tmp_keys, spans) if spans else None
        if repeated is not None:
            raise ShardError(repeated)
        os.replace(tmp_npy, out)
        os.replace(tmp_keys, stem + ".keys.txt")
    finally:
        for path in (tmp_npy, tmp_keys):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if (labels >= 0).any():
        np.save(stem + ".labels.npy", labels)


def _embed_block(model, source, part: str, rank: int, world: int, image_size: int,
                 batch_size: int, flip: bool) -> Tuple[int, int]:
    """One rank's block of the input -> its part files (.f32 rows, .keys, .labels, and .shards:
    [shard URL, rows] runs in row order, for naming the shards of a repeated key); returns
    (rows, embedding width)."""
    from hybrid_fc.data.storage import OutputError
    from .verification import decode_images, embed_images
    count, dim, spans = 0, 0, []
    with contextlib.ExitStack() as files:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(part)), exist_ok=True)
            fe, fk, fl = (files.enter_context(open(part + ext, mode)) for ext, mode in
                          ((".f32", "wb"), (".keys", "w"), (".labels", "wb")))
        except OSError as e:
            raise OutputError(f"cannot write {part}.*: {e} (the folder of out must be one "
                              "every rank can write to)") from None
        batch: List[Tuple[str, bytes, int, Optional[str]]] = []

        def flush():
            nonlocal count, dim
            images = decode_images([b for _, b, _, _ in batch], image_size, where=str(source),
                                   names=[f"{key!r}" + (f" of {shard}" if shard else "")
                                          for key, _, _, shard in batch])
            emb, _ = embed_images(model, images, batch_size, flip)
            fe.write(emb.cpu().numpy().astype(np.float32).tobytes())
            for key, _, _, shard in batch:
                if not key.isprintable():  # a newline, a control character, non-UTF-8 bytes
                    raise ValueError(f"{shard or source}: key {key!r} cannot be a line of the "
                                     "keys file (a newline, a control character, or a name "
                                     "that is not UTF-8)")
                fk.write(key + "\n")
            fl.write(np.asarray([l for _, _, l, _ in batch], np.int64).tobytes())
            count, dim = count + len(batch), emb.shape[1]
            batch.clear()

        for item in _rank_items(source, rank, world):
            if item[3] is not None:
                if not spans or spans[-1][0] != item[3]:
                    spans.append([item[3], 0])
                spans[-1][1] += 1
            batch.append(item)
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    with open(part + ".shards", "w") as f:
        json.dump(spans, f)
    return count, dim


def extract_embeddings(model, source: Union[str, Sequence[str]], out: str, image_size: int, *,
                       batch_size: int = 128, flip: bool = True, group=None) -> int:
    """Embed every image of `source` (an image folder, or shards: a manifest folder/file, a
    brace pattern or a list of URLs) and write `out` (.npy), its keys and labels files.
    Collective over `group`; returns the number of images. An error on any rank (a bad shard,
    a key two samples share) stops every rank: that rank raises it, the others RankFailed
    naming it, and no part or temporary file is left."""
    from hybrid_fc.collectives import (agree_on_error, comm_device, gather_batch_meta,
                                       group_rank, group_size)
    if not out.endswith(".npy"):
        raise ValueError(f"out must be a .npy path, got {out!r}")
    check_source(source)
    rank, world = group_rank(group), group_size(group)
    stem = out[:-len(".npy")]
    part = f"{stem}.part{rank:05d}"
    rows, error = (0, 0), None
    try:
        try:
            rows = _embed_block(model, source, part, rank, world, image_size, batch_size, flip)
        except Exception as exc:  # noqa: BLE001 - shared with every rank below, then raised
            error = exc
        agree_on_error(error, group)  # also the barrier: every part file is complete
        meta = gather_batch_meta(torch.tensor(rows, device=comm_device(group)), group)
        total = sum(n for n, _ in meta)
        if total == 0:
            raise ValueError(f"{source} holds no images")
        if rank == 0:
            try:
                spans = []
                for r in range(world):
                    with open(f"{stem}.part{r:05d}.shards") as f:
                        spans += [tuple(s) for s in json.load(f)]
                _concatenate(stem, out, meta, spans)
            except Exception as exc:  # noqa: BLE001 - shared with every rank below
                error = exc
        agree_on_error(error, group)  # out is complete, or every rank raises
    finally:
        for ext in (".f32", ".keys", ".labels", ".shards"):
            with contextlib.suppress(FileNotFoundError):
                os.remove(part + ext)
    return total

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
import os
from typing import Iterator, List, Sequence, Tuple, Union

import numpy as np
import torch

from ..common import split_span

__all__ = ["IMAGE_EXTENSIONS", "list_folder", "iter_shard_samples", "extract_embeddings"]

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


def iter_shard_samples(url: str) -> Iterator[Tuple[str, bytes, int]]:
    """(key, encoded image, label or -1) of each sample of one tar shard, in archive order."""
    from hybrid_fc.data.storage import open_read
    from hybrid_fc.data.tario import iter_tar
    key, image, label = None, None, -1
    with open_read(url) as stream:
        for name, data in iter_tar(stream):
            base = os.path.basename(name)
            k, _, ext = base.partition(".")
            k = name[:len(name) - len(base)] + k
            if k != key:
                if key is not None and image is not None:
                    yield key, image, label
                key, image, label = k, None, -1
            ext = ext.lower()
            if ext in ("jpg", "jpeg", "png", "webp", "bmp"):
                image = data
            elif ext == "cls":
                label = int(data.decode().strip())
    if key is not None and image is not None:
        yield key, image, label


def _rank_items(source: Union[str, Sequence[str]], rank: int, world: int):
    """This rank's contiguous block of the input, as an iterator of (key, bytes, label)."""
    if isinstance(source, str) and os.path.isdir(source) and \
            not os.path.isfile(os.path.join(source, "manifest.json")):
        files = list_folder(source)
        lo, hi = split_span(len(files), rank, world)

        def folder_items():
            for key, full in files[lo:hi]:
                with open(full, "rb") as f:
                    yield key, f.read(), -1
        return folder_items()
    from hybrid_fc.data import load_manifest
    urls = load_manifest(source).urls
    lo, hi = split_span(len(urls), rank, world)

    def shard_items():
        for url in urls[lo:hi]:
            yield from iter_shard_samples(url)
    return shard_items()


def extract_embeddings(model, source: Union[str, Sequence[str]], out: str, image_size: int, *,
                       batch_size: int = 128, flip: bool = True, group=None) -> int:
    """Embed every image of `source` (an image folder, or shards: a manifest folder/file, a
    brace pattern or a list of URLs) and write `out` (.npy), its keys and labels files.
    Collective over `group`; returns the number of images."""
    from hybrid_fc.collectives import comm_device, gather_batch_meta, group_rank, group_size
    from .verification import decode_images, embed_images
    if not out.endswith(".npy"):
        raise ValueError(f"out must be a .npy path, got {out!r}")
    rank, world = group_rank(group), group_size(group)
    stem = out[:-len(".npy")]
    part = f"{stem}.part{rank:05d}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    count, dim, error = 0, 0, None
    try:
        with open(part + ".f32", "wb") as fe, open(part + ".keys", "w") as fk, \
                open(part + ".labels", "wb") as fl:
            batch: List[Tuple[str, bytes, int]] = []

            def flush():
                nonlocal count, dim
                images = decode_images([b for _, b, _ in batch], image_size, where=str(source))
                emb, _ = embed_images(model, images, batch_size, flip)
                fe.write(emb.cpu().numpy().astype(np.float32).tobytes())
                for key, _, label in batch:
                    if "\n" in key:
                        raise ValueError(f"sample key {key!r} contains a newline")
                    fk.write(key + "\n")
                fl.write(np.asarray([l for _, _, l in batch], np.int64).tobytes())
                count, dim = count + len(batch), emb.shape[1]
                batch.clear()

            for item in _rank_items(source, rank, world):
                batch.append(item)
                if len(batch) == batch_size:
                    flush()
            if batch:
                flush()
    except Exception as exc:  # reported to every rank below, then raised here
        error = exc
    # Also the barrier: every part file is complete when this returns on any rank.
    meta = gather_batch_meta(torch.tensor([count, dim, int(error is not None)],
                                          device=comm_device(group)), group)
    if error is not None:
        raise error
    if any(m[2] for m in meta):
        raise RuntimeError(f"embedding extraction failed on rank(s) "
                           f"{[r for r, m in enumerate(meta) if m[2]]} (see their errors)")
    total = sum(m[0] for m in meta)
    dims = {m[1] for m in meta if m[0]}
    if len(dims) != 1:
        raise RuntimeError(f"ranks disagree on the embedding width: {sorted(dims)}")
    (D,) = dims
    if rank == 0:
        emb = np.lib.format.open_memmap(out + ".tmp.npy", mode="w+", dtype=np.float32,
                                        shape=(total, D))
        labels = np.empty(total, np.int64)
        row = 0
        with open(stem + ".keys.txt.tmp", "w") as keys:
            for r, (n, _, _) in enumerate(meta):
                p = f"{stem}.part{r:05d}"
                if n:
                    emb[row:row + n] = np.fromfile(p + ".f32", np.float32).reshape(n, D)
                    labels[row:row + n] = np.fromfile(p + ".labels", np.int64)
                    with open(p + ".keys") as fk:
                        keys.write(fk.read())
                row += n
        emb.flush()
        del emb
        os.replace(out + ".tmp.npy", out)
        os.replace(stem + ".keys.txt.tmp", stem + ".keys.txt")
        if (labels >= 0).any():
            np.save(stem + ".labels.npy", labels)
        for r in range(world):
            for ext in (".f32", ".keys", ".labels"):
                try:
                    os.remove(f"{stem}.part{r:05d}{ext}")
                except FileNotFoundError:
                    pass
    gather_batch_meta(torch.tensor([0], device=comm_device(group)), group)  # out is complete
    return total

"""Streaming loader: WebDataset shards -> (uint8 images (B, 3, H, W), int64 labels (B,)) per rank.

Guarantees
* Every rank yields exactly `len(loader)` = num_samples // (world_size * batch_size) batches per
  epoch, whatever the number of shards, so no rank runs out before the others and hangs the next
  collective (webdataset #188/#225/#434).
* Shards are streamed with resampling but without replacement where possible: one infinite
  stream per epoch made of seeded permutations of all shards, one after the other, dealt
  round-robin first to ranks (`split_by_rank`), then to each rank's DataLoader workers
  (`split_by_worker`). Consumers read at the same pace, so an epoch reads each shard about once
  and no consumer ever lacks shards, even with fewer shards than ranks x workers.
* Order is a function of (seed, epoch, rank, world_size, num_workers, batch_size,
  shuffle_buffer, the URL list); it does not depend on timing.
* `state_dict()` records the epoch, the batches handed out, and how many raw samples each worker
  stream consumed; a loader restored from it continues the epoch where it stopped (the
  skipped part is read again but not decoded: cost ~ I/O only). `load_state_dict` checks every
  field first.
* Corrupt samples (undecodable image, bad label) are skipped and counted, images of another
  size are resized and counted; a shard that fails mid-way (truncated tar, dropped connection)
  is counted and the stream moves on. Counts are in `loader.stats` and logged. A missing shard,
  or a run of shards that all fail, raises ShardError; a worker process that dies, LoaderError.
* A manifest's shard entries are file names beside it, never commands, paths or URLs
  (`load_manifest`); `check_shards` (run by make_loader on every rank) opens shards before
  training, so a wrong path, endpoint or credential is an error within seconds, not an endless
  retry loop; a remote store that stops answering is an error within about data.retry_s.
"""
import itertools
import json
import logging
import os
import pickle
import random
import re
import shlex
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import webdataset as wds

from ..common import split_span, stable_seed
from .decode import fit_size, make_decoder
from .tario import TarError, iter_tar
from .storage import (endpoint_of, is_remote, join_url, open_read, read_bytes,
                      register_s3_handler)

__all__ = ["ShardError", "LoaderError", "Manifest", "load_manifest", "check_shards",
           "make_loader", "ShardLoader", "epoch_shards", "split_by_rank", "split_by_worker"]

log = logging.getLogger(__name__)


class ShardError(RuntimeError):
    """A shard that cannot be opened or read; the message names the URL(s)."""


class LoaderError(RuntimeError):
    """The loader cannot go on for a reason outside the data: a worker process died."""


# --- manifest --------------------------------------------------------------------------------

@dataclass
class Manifest:
    urls: List[str]
    num_samples: Optional[int] = None
    num_classes: Optional[int] = None
    counts: Optional[List[int]] = None


_SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
# What a manifest may call a shard: one file name beside the manifest, in characters that no
# shell, URL or path gives a meaning to. Not a path (`../x.tar`, `/etc/x.tar`: read from outside
# the dataset, or from local disk under an s3:// manifest), not a URL, not a command.
_PLAIN_SHARD = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,250}(\.tar|\.tar\.gz|\.tgz)")


def _shard_name(entry, murl: str, i: int) -> str:
    """Entry i of a manifest's shard list as a file name beside the manifest, or ShardError
    naming the manifest, the entry and why. `pipe:` commands come only from the user's own
    command line or config (url_template, a data.urls pattern), never from a file someone else
    may have written."""
    url = entry.get("url") if isinstance(entry, dict) else None
    where = f"{murl}: shards[{i}]"
    if not isinstance(url, str) or not url.strip():
        raise ShardError(f"{where} has no url name: {str(entry)[:100]!r}")
    if _PLAIN_SHARD.fullmatch(url):
        return url
    odd = sorted({c for c in url if not (c.isascii() and (c.isalnum() or c in "._-/\\"))})
    if url.lstrip().startswith("pipe:"):
        why = "is a command"
    elif "://" in url:
        scheme = murl.split("://", 1)[0].lower() if "://" in murl else "local"
        why = f"points outside the manifest's own {scheme} location"
    elif odd:
        why = f"holds characters a shell or a URL gives a meaning to ({''.join(odd)!r})"
    elif "/" in url or "\\" in url:
        why = "is a path"
    else:
        why = "is not a plain shard file name"
    raise ShardError(f"{where}: url {url[:80]!r} {why}; a manifest names each shard by its file "
                     "name beside the manifest (letters, digits, '.', '_', '-', ending in "
                     f"{', '.join(_SHARD_SUFFIXES)}), as data/make_shards.py writes it")


def _manifest_count(value, field: str, murl: str, minimum: int = 0) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= minimum:
        return value
    raise ShardError(f"{murl}: {field} must be an integer >= {minimum}, got {value!r}")


def _refuse_repeats(urls: Sequence[str], where: str):
    """The same shard twice would be read twice per epoch (and a rank pair could hold the same
    samples): refused, naming both entries."""
    first = {}
    for i, u in enumerate(urls):
        j = first.setdefault(u, i)
        if j != i:
            raise ShardError(f"{where} {j} and {i} are the same shard {u!r}; list each shard "
                             "once")


def _parse_manifest(raw: bytes, murl: str) -> Manifest:
    """A manifest's bytes -> Manifest, every field checked; ShardError names the manifest and
    the field. num_classes may be absent (labels are then only checked to be >= 0)."""
    try:
        data = json.loads(raw)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ShardError(f"{murl} is not a JSON manifest ({type(e).__name__}: {e})") from None
    if not isinstance(data, dict):
        raise ShardError(f"{murl} holds a JSON {type(data).__name__}, not a manifest object "
                         "with 'shards' and 'num_samples' (data/make_shards.py writes one)")
    for k in ("shards", "num_samples"):
        if k not in data:
            raise ShardError(f"{murl}: manifest has no {k!r} field")
    shards = data["shards"]
    if not isinstance(shards, list) or not shards:
        raise ShardError(f"{murl}: 'shards' must be a non-empty list of {{\"url\", \"count\"}} "
                         f"entries, got {str(shards)[:80]!r}")
    names = [_shard_name(s, murl, i) for i, s in enumerate(shards)]
    counts = [_manifest_count(s.get("count"), f"shards[{i}].count", murl)
              for i, s in enumerate(shards)]
    _refuse_repeats(names, f"{murl}: shards")
    num_samples = _manifest_count(data["num_samples"], "num_samples", murl)
    num_classes = data.get("num_classes")
    if num_classes is not None:
        num_classes = _manifest_count(num_classes, "num_classes", murl, 1)
    if sum(counts) != num_samples:
        raise ShardError(f"{murl}: num_samples is {num_samples} but its shards' counts "
                         f"add up to {sum(counts)}; the manifest was edited or is from "
                         "another conversion (make_shards writes it)")
    base = murl.rsplit("/", 1)[0] if "/" in murl else "."
    return Manifest([join_url(base, n) for n in names], num_samples, num_classes, counts)


def _read_manifest(src: str, murl: str, timeout: float) -> Manifest:
    """The manifest at murl (named by the user as `src`); ShardError when it cannot be read
    (from a remote store: within about `timeout` seconds)."""
    try:
        raw = read_bytes(murl, timeout)
    except FileNotFoundError:
        folder = os.path.dirname(murl) or "."
        if not is_remote(murl) and not os.path.isdir(folder):
            raise ShardError(f"{src} does not exist (expected a folder or s3:// prefix holding "
                             "manifest.json, a manifest.json, a shard or a brace pattern)"
                             ) from None
        raise ShardError(f"no manifest at {murl} (a single shard's name ends in "
                         f"{' / '.join(_SHARD_SUFFIXES)})") from None
    except ImportError:
        raise
    except Exception as e:  # noqa: BLE001 - a dead endpoint, bad credentials, EACCES
        if not (is_remote(murl) or isinstance(e, OSError)):
            raise
        raise ShardError(f"cannot read {murl} from {endpoint_of(murl)}: "
                         f"{type(e).__name__}: {e}") from None
    return _parse_manifest(raw, murl)


def load_manifest(source: Union[str, Sequence[str]], url_template: Optional[str] = None,
                  timeout: float = 16.0) -> Manifest:
    """Shard URLs (+ sample and class counts when known) from:
    a manifest.json path/URL, a directory or s3:// prefix holding manifest.json, a brace pattern
    (`dir/shard-{000000..000099}.tar`), or a list of URLs. A shard listed twice is an error.
    url_template: e.g. "pipe:aws s3 cp {url} -" rewrites every URL (reading through a command);
    in a pipe: template each URL is shell-quoted, so a name is never more than one argument.
    timeout: a remote manifest that does not arrive within about this many seconds is an error.
    """
    if isinstance(source, (list, tuple)):
        if not all(isinstance(u, str) and u for u in source):
            raise ShardError(f"a URL list must hold non-empty strings, got {list(source)[:5]!r}")
        m = Manifest(list(source))
        _refuse_repeats(m.urls, "the URL list's entries")
    else:
        src = str(source)
        # A folder or prefix (with or without a trailing slash, local or s3://) holds a
        # manifest.json; a shard name, a brace pattern or a pipe: command is a shard list.
        shards = src.startswith("pipe:") or "{" in src or src.endswith(_SHARD_SUFFIXES)
        if src.endswith(".json"):
            m = _read_manifest(src, src, timeout)
        elif not shards:
            m = _read_manifest(src, join_url(src, "manifest.json"), timeout)
        else:
            m = Manifest(wds.shardlists.expand_urls(src))
            _refuse_repeats(m.urls, f"{src}: its entries")
    if not m.urls:
        raise ShardError(f"no shard URLs in {source!r}")
    if url_template:
        if "{url}" not in url_template:
            raise ValueError(f"url_template {url_template!r} has no {{url}} to fill in")
        quote = shlex.quote if url_template.lstrip().startswith("pipe:") else str
        try:
            m.urls = [url_template.format(url=quote(u)) for u in m.urls]
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"url_template {url_template!r}: {{url}} is its only field; write "
                             f"other braces as {{{{ }}}} ({type(e).__name__}: {e})") from None
    return m


# --- pre-flight check ------------------------------------------------------------------------

def _tar_header_ok(block: bytes) -> bool:
    if len(block) < 512:
        return False
    try:
        stored = int(block[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:512])


def _probe(url: str, timeout: float) -> Optional[str]:
    """None if `url` opens and starts with a valid tar header, else the reason."""
    try:
        stream = open_read(url, timeout / 2)  # the HEAD and the GET each
    except Exception as e:  # noqa: BLE001 - reported with the URL
        return f"{type(e).__name__}: {e}"
    proc = getattr(stream, "proc", None)  # webdataset Pipe: the command behind a pipe: URL
    try:
        block = stream.read(512)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    finally:
        if proc is not None:
            proc.kill()  # we only wanted the first block; do not wait for the whole shard
            proc.wait()
            stream.stream.close()
        else:
            stream.close()
    if not block:
        status = f" (command exit status {proc.returncode})" if proc is not None else ""
        return f"read 0 bytes{status}"
    if not _tar_header_ok(block):
        return "does not start with a tar header"
    return None


def check_shards(urls: Sequence[str], *, timeout: float = 10.0, max_remote: int = 4,
                 seed: int = 0):
    """Raise ShardError unless the shards can be opened.

    Every local path must exist (one stat each). Then up to `max_remote` shards (first, last, a
    seeded sample of the rest) are opened in parallel threads and their first 512 bytes must be
    a tar header, each within `timeout` seconds. That catches a wrong path, endpoint, bucket or
    credential before training; kept small because a pipe: URL starts a process (`aws` ~1 s).
    A shard missing beyond the sample raises when the stream reaches it.
    """
    local = [u for u in urls if not is_remote(u) and not u.startswith("pipe:")]
    missing = [u for u in local if not os.path.isfile(u.replace("file://", ""))]
    if missing:
        raise ShardError(f"{len(missing)} of {len(urls)} shards do not exist or are not files "
                         f"(a folder?), e.g. {missing[:3]}")
    rest = list(urls)
    picks = [rest[0], rest[-1]] + random.Random(seed).sample(rest, min(len(rest), max_remote))
    picks = list(dict.fromkeys(picks))[:max_remote]
    results = {}

    def run(u):
        results[u] = _probe(u, timeout)

    # daemon threads: a probe that hangs (unreachable endpoint) must not keep the process alive
    threads = [threading.Thread(target=run, args=(u,), daemon=True) for u in picks]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    bad = {u: results.get(u, f"no answer within {timeout:g}s") for u in picks
           if results.get(u, "timeout") is not None}
    if bad:
        lines = "\n".join(f"  {u}: {why}" for u, why in list(bad.items())[:5])
        raise ShardError(f"{len(bad)} of {len(picks)} checked shards cannot be read:\n{lines}\n"
                         "For s3:// check AWS_ENDPOINT_URL / credentials on this node.")


# --- pipeline stages (run in the DataLoader workers) -------------------------------------------

def epoch_shards(urls: Sequence[str], seed: int, epoch: int) -> Iterator[str]:
    """Infinite stream: a seeded permutation of all URLs, then another, ... (per epoch)."""
    for p in itertools.count():
        order = list(urls)
        random.Random(stable_seed(seed, epoch, p)).shuffle(order)
        yield from order


def split_by_rank(src: Iterator, rank: int, world_size: int) -> Iterator:
    """Node split, stated explicitly: rank r takes items r, r + W, r + 2W, ..."""
    return itertools.islice(src, rank, None, world_size)


def split_by_worker(src: Iterator, worker: int, num_workers: int) -> Iterator:
    """Worker split within a rank: worker w takes items w, w + N, ..."""
    return itertools.islice(src, worker, None, num_workers)


@dataclass
class StreamStats:
    """Counters of one worker stream (cumulative over the epoch, including a resumed part)."""
    raw_samples: int = 0
    """Samples taken out of the shuffle buffer (decoded or skipped)."""
    corrupt_samples: int = 0
    shard_errors: int = 0
    resized_samples: int = 0
    """Decoded images of another size than the batch's, resized (bilinear) to fit it."""
    errors: List[str] = field(default_factory=list)  # the first few messages, for the log

    def counters(self) -> dict:
        """What a worker reports with each batch (a state_dict's worker_stats entry)."""
        return {c: getattr(self, t) for t, c in zip(_TOTALS, _COUNTERS)}


def _note(stats: StreamStats, msg: str):
    if len(stats.errors) < 5:
        stats.errors.append(msg)
        log.warning(msg)


def group_samples(files: Iterator[Tuple[str, bytes]], url: str) -> Iterator[dict]:
    """Consecutive tar members sharing a key -> {"__key__", "__url__", ext: bytes}.

    The key is the member name up to the first dot of its base name, the extension the rest,
    lower-cased (webdataset's convention; string operations instead of its per-file regex).
    """
    sample = None
    for name, data in files:
        slash = name.rfind("/")
        dot = name.find(".", slash + 1)
        if dot < 0:
            continue  # no extension: not part of a sample
        key, ext = name[:dot], name[dot + 1:].lower()
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[ext] = data  # a repeated extension keeps the last copy
    if sample is not None:
        yield sample


class _TimedReads:
    """A remote shard stream that notes when its latest read() began. A read that fails after
    waiting out its timeout began the outage, so data.retry_s counts from there, not from the
    moment the timeout fired. Cost: one Python call per read (a tar reader makes ~4 a sample,
    ~0.2 us each, next to ~40 us of S3 reading and decoding)."""

    def __init__(self, stream):
        self.stream, self.started = stream, time.monotonic()

    def read(self, n: int = -1) -> bytes:
        self.started = time.monotonic()
        return self.stream.read(n)


def read_shards(urls: Iterator[str], stats: StreamStats, max_failures: int = 8,
                counts: Optional[dict] = None, retry_s: float = 20.0) -> Iterator[dict]:
    """Open each URL and yield its samples as {"__key__", "__url__", ext: bytes}.

    A remote shard (s3://, http) whose connection fails is opened again with backoff, skipping
    the samples it already gave, until `retry_s` seconds after the failing request began; then
    ShardError names the shard and the endpoint (a store that went away stops training within
    the bound instead of spinning; one that comes back loses nothing). The bound holds for a
    server that stops answering too: each request's timeouts are cut from the time left (the
    first attempt's from retry_s / 2, at least 1 s), so a stall ends within about retry_s + 1 s.
    A shard whose data is broken (truncated tar, any local read error, a pipe: command's
    failure) is counted and skipped; `max_failures` of them in a row without a single sample
    raise ShardError. A missing file raises at once. counts: {url: samples} from the manifest;
    a shard read to its end with another number of samples raises ShardError (a manifest that
    lies about its counts would silently stretch or shrink every epoch).
    """
    failed_in_row = []
    for url in urls:
        n, error, first_failure, attempt = 0, None, None, 0
        timeout = max(1.0, retry_s / 2)
        while True:
            began = time.monotonic()
            try:
                stream = open_read(url, timeout)
            except FileNotFoundError as e:
                raise ShardError(f"shard {url} does not exist ({e})") from None
            except Exception as e:  # noqa: BLE001 - classified below
                stream, error = None, e
            if stream is not None:
                abandoned, given = False, n
                timed = _TimedReads(stream) if _remote(url) else stream
                try:
                    samples = group_samples(iter_tar(timed), url)
                    for sample in itertools.islice(samples, given, None):  # after a retry
                        n += 1
                        yield sample
                except GeneratorExit:  # the epoch ended mid-shard
                    abandoned = True
                    raise
                except Exception as e:  # noqa: BLE001 - truncated tar, read error, exit status
                    error, began = e, getattr(timed, "started", began)
                finally:
                    error = _close(stream, abandoned) or error
            if error is None or not _transient(url, error):
                break
            first_failure = began if first_failure is None else first_failure
            left = retry_s - (time.monotonic() - first_failure)
            if left <= 0:
                raise ShardError(f"shard {url} cannot be read from {endpoint_of(url)}: "
                                 f"{type(error).__name__}: {error} (after {n} samples; still "
                                 f"failing after {attempt} retries in {retry_s:g} s, "
                                 "data.retry_s)") from None
            wait = min(0.5 * 2 ** attempt, left / 2)
            _note(stats, f"shard {url}: {type(error).__name__}: {error} (after {n} samples); "
                         f"retrying in {wait:.1f} s")
            time.sleep(wait)
            # the reopen's two requests (HEAD, first GET) fit in what is left
            timeout = (left - wait) / 2
            attempt, error = attempt + 1, None
        expected = counts.get(url) if counts else None
        if error is None and expected is not None and n != expected:
            raise ShardError(f"shard {url} holds {n} samples but the manifest says "
                             f"{expected}: the manifest does not describe these shards "
                             "(edited, or written for another conversion); run "
                             "data/make_shards.py again or fix its counts")
        if error is not None:
            stats.shard_errors += 1
            _note(stats, f"shard {url}: {type(error).__name__}: {error} (after {n} samples)")
        if error is not None and n == 0:
            failed_in_row.append(f"{url}: {type(error).__name__}: {error}")
            if len(failed_in_row) >= max_failures:
                raise ShardError(f"{len(failed_in_row)} shards in a row could not be read:\n  "
                                 + "\n  ".join(failed_in_row[-3:]))
        else:
            failed_in_row = []


def _remote(url: str) -> bool:
    """A URL of a remote store, whose connection failures are worth retrying."""
    return url.startswith(("s3://", "http://", "https://", "gs://"))


def _transient(url: str, error: Exception) -> bool:
    """A failure worth retrying: a remote store's connection or server error, not broken data
    (a tar that ends early or has a bad header fails the same way every time)."""
    return _remote(url) and not isinstance(error, (TarError, ShardError))


def _close(stream, abandoned: bool) -> Optional[Exception]:
    """Close a shard stream; returns the error a pipe command's exit status reports. An
    abandoned pipe: command is killed rather than waited for (a CLI such as `aws s3 cp` may
    take seconds to notice its reader is gone)."""
    proc = getattr(stream, "proc", None)
    try:
        if abandoned and proc is not None:
            proc.kill()
            proc.wait()
            stream.stream.close()
        else:
            stream.close()
    except Exception as e:  # noqa: BLE001 - webdataset Pipe raises the exit status here
        return e
    return None


def _skip(src: Iterator, n: int, stats: StreamStats) -> Iterator:
    """Resume: drop the first n raw samples (already trained on) without decoding them."""
    for _ in itertools.islice(src, n):
        stats.raw_samples += 1
    return src


def _alloc(shape: Tuple[int, ...], dtype) -> torch.Tensor:
    """An empty tensor; in a DataLoader worker, allocated in shared memory so that handing the
    batch to the main process does not copy it again.

    Cost per 128 x 112 x 112 x 3 batch, measured: UntypedStorage._new_shared (what torch's own
    default_collate uses) ~3.6 ms with first-touch page faults, i.e. ~28 us per image;
    tensor.share_memory_() on an existing tensor ~12 ms (~95 us per image, most of a decode).
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    numel = int(np.prod(shape))
    try:
        storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype)
                                                   .element_size())
        return torch.empty(0, dtype=dtype).set_(storage).view(shape)
    except (AttributeError, RuntimeError):  # private API: fall back to the slow public one
        return torch.empty(shape, dtype=dtype).share_memory_()


def _corrupt(stats: StreamStats, sample: dict, error: Exception):
    stats.corrupt_samples += 1
    _note(stats, f"corrupt sample {sample.get('__key__')} in {sample.get('__url__')}: "
                 f"{type(error).__name__}: {error}")


def decode_batches(samples: Iterator[dict], batch_size: int, stats: StreamStats, worker: int,
                   decoder: str = "auto", image_size: Optional[Tuple[int, int]] = None,
                   num_classes: Optional[int] = None) -> Iterator[tuple]:
    """Decode samples into (uint8 (B, 3, H, W), int64 (B,), info) batches; skip corrupt ones.

    The images are written NHWC (what decoders produce) and returned as a (B, 3, H, W) view of
    that memory, i.e. channels_last strides: no transpose copy in the worker.
    """
    decode = make_decoder(decoder)
    images = labels = None
    i = 0
    for s in samples:
        stats.raw_samples += 1
        data = s.get("jpg", s.get("jpeg", s.get("png")))
        try:
            if data is None:
                raise ValueError(f"no jpg/png member (has {sorted(k for k in s if k[0] != '_')})")
            label = int(s["cls"])
        except Exception as e:  # noqa: BLE001 - an unreadable sample is skipped and counted
            _corrupt(stats, s, e)
            continue
        if label < 0 or (num_classes is not None and label >= num_classes):
            # not a damaged sample but a wrong description of the dataset: stop, name the shard
            raise ShardError(
                f"shard {s.get('__url__')}: sample {s.get('__key__')} has label {label}, outside "
                f"[0, {num_classes}) (the manifest's num_classes): the manifest understates "
                "num_classes or the shard belongs to another dataset")
        try:
            rgb = decode(data)
            if rgb.ndim != 3 or rgb.shape[2] != 3:
                raise ValueError(f"decoded shape {rgb.shape}")
        except Exception as e:  # noqa: BLE001 - any undecodable sample is skipped and counted
            _corrupt(stats, s, e)
            continue
        if image_size is None:
            image_size = tuple(rgb.shape[:2])
        if images is None:
            images = _alloc((batch_size, *image_size, 3), torch.uint8)
            labels = _alloc((batch_size,), torch.int64)
            # numpy views: per-sample torch indexing costs ~10 us, a numpy store ~1 us
            images_np, labels_np = images.numpy(), labels.numpy()
        if rgb.shape[:2] != image_size:
            stats.resized_samples += 1
            _note(stats, f"sample {s.get('__key__')} in {s.get('__url__')}: a "
                         f"{rgb.shape[0]}x{rgb.shape[1]} image, resized to "
                         f"{image_size[0]}x{image_size[1]}")
            rgb = fit_size(rgb, image_size)
        images_np[i] = rgb
        labels_np[i] = label
        i += 1
        if i == batch_size:
            info = {"worker": worker, "raw": stats.raw_samples, **stats.counters()}
            yield images.permute(0, 3, 1, 2), labels, info
            images = labels = None
            i = 0


class _RankStream(torch.utils.data.IterableDataset):
    """One rank's batches for the rest of one epoch; each DataLoader worker builds its own
    webdataset pipeline. Plain data only, so it pickles for spawn-started workers too."""

    def __init__(self, cfg: dict, rotation: int, remaining: List[int], skip: List[int],
                 carried: List[dict]):
        super().__init__()
        self.cfg, self.rotation, self.remaining, self.skip = cfg, rotation, remaining, skip
        self.carried = carried  # counters each logical worker had reached before a resume

    def __iter__(self):
        c = self.cfg
        info = torch.utils.data.get_worker_info()
        nw = c["num_workers_logical"]
        # physical worker w plays logical worker (w + rotation) % nw, so that after a resume
        # the DataLoader's round-robin starts with the worker that owns the next batch
        worker = ((info.id if info else 0) + self.rotation) % nw
        if c["register_s3"]:
            register_s3_handler()
        carried = self.carried[worker]
        stats = StreamStats(**{t: carried.get(c, 0) for t, c in zip(_TOTALS, _COUNTERS)})
        stages = [
            lambda: epoch_shards(c["urls"], c["seed"], c["epoch"]),
            partial(split_by_rank, rank=c["rank"], world_size=c["world_size"]),
            partial(split_by_worker, worker=worker, num_workers=nw),
            partial(read_shards, stats=stats, max_failures=c["max_failures"],
                    counts=c["counts"], retry_s=c["retry_s"]),
        ]
        if c["shuffle_buffer"] > 1:
            rng = random.Random(stable_seed(c["seed"], c["epoch"], c["rank"], worker, "shuffle"))
            stages.append(wds.shuffle(c["shuffle_buffer"], initial=c["shuffle_buffer"], rng=rng))
        stages += [
            partial(_skip, n=self.skip[worker], stats=stats),
            partial(decode_batches, batch_size=c["batch_size"], stats=stats, worker=worker,
                    decoder=c["decoder"], image_size=c["image_size"],
                    num_classes=c["num_classes"]),
        ]
        # with_epoch: exactly this worker's share of the rank's batches, then stop
        return _errors_as_items(wds.DataPipeline(*stages).with_epoch(self.remaining[worker]))


class _WorkerError:
    """An error of hybrid_fc's own (a ShardError, a bad label) raised in a DataLoader worker,
    carried to the main process as an item and raised there as it was. torch would re-raise it
    with the worker's whole traceback inside the message: 20 lines where the user needs the
    one that names the shard."""

    def __init__(self, error: Exception):
        self.error = error


def _errors_as_items(batches) -> Iterator:
    try:
        yield from batches
    except Exception as e:
        if torch.utils.data.get_worker_info() is None or \
                not type(e).__module__.startswith("hybrid_fc"):
            raise  # in the main process, or a bug: the traceback stays
        try:
            pickle.dumps(e)
        except Exception:  # noqa: BLE001 - cannot travel: torch's own path, traceback included
            raise e from None
        yield _WorkerError(e)


def _worker_signals(worker_id: int) -> None:
    """A worker leaves SIGINT and SIGTERM to its rank. Ctrl-C reaches a terminal's whole
    process group and DeepSpeed's launcher signals its whole process tree, but a preempted rank
    still fetches batches while it finishes its step and saves (the trainer's Preemption); it
    then stops its workers itself (the loader's shutdown), and a worker whose rank died exits
    by torch's parent watchdog. (A forked worker would otherwise also inherit the rank's own
    Python handlers.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _iter_without_sigchld_errors(loader: torch.utils.data.DataLoader):
    """iter(loader) with torch's SIGCHLD handler taken out again. torch installs it (once per
    process, on the main thread) at the first multi-worker iterator; it raises "DataLoader
    worker ... is killed by signal" from whatever code runs when a worker dies: in a trainer,
    inside a collective on that one rank, which leaves the other ranks with a gloo traceback.
    Without it torch finds the dead worker at the next batch fetch (it checks its workers every
    5 s while waiting), inside this loader, where the error can be shared by every rank. A
    handler torch installed earlier (a DataLoader of other code in this process) is left."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGCHLD) if main else None
    batches = iter(loader)
    if main and signal.getsignal(signal.SIGCHLD) is not before:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL if before is None else before)
    return batches


class ShardLoader:
    """Iterable over one rank's batches; see the module docstring for its guarantees.

    Iterating yields the remaining batches of the current epoch, then advances `epoch`.
    """

    def __init__(self, manifest: Manifest, batch_size: int, *, rank: int, world_size: int,
                 num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0,
                 epoch: int = 0, samples_per_epoch: Optional[int] = None,
                 image_size: Optional[Union[int, Tuple[int, int]]] = None,
                 decoder: str = "auto", pin_memory: bool = False, prefetch_factor: int = 2,
                 max_failures: int = 8, retry_s: float = 20.0):
        _check_int("batch_size", batch_size, 1)
        _check_int("world_size", world_size, 1)
        _check_int("num_workers", num_workers, 0)
        _check_int("shuffle_buffer", shuffle_buffer, 0)
        _check_int("epoch", epoch, 0)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank!r}")
        n = samples_per_epoch if samples_per_epoch is not None else manifest.num_samples
        if n is None:
            raise ValueError("samples_per_epoch: the epoch length is unknown: brace patterns, "
                             "URL lists and pipe: commands carry no manifest.json. Pass "
                             "samples_per_epoch (YAML: data.samples_per_epoch=N, the number of "
                             "samples in the shards), or point the source at the folder or "
                             "s3:// prefix data/make_shards.py wrote (manifest.json inside)")
        self.batches_per_epoch = n // (world_size * batch_size)
        if self.batches_per_epoch < 1:
            raise ValueError(f"batch_size: {n} samples per epoch give no full batch of "
                             f"{batch_size} on each of {world_size} ranks")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.manifest, self.num_samples = manifest, n
        self.num_classes = manifest.num_classes
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers = num_workers
        self.pin_memory, self.prefetch_factor = pin_memory, prefetch_factor
        self.cfg = dict(urls=list(manifest.urls), seed=seed, rank=rank, world_size=world_size,
                        num_workers_logical=max(1, num_workers), batch_size=batch_size,
                        shuffle_buffer=shuffle_buffer, decoder=decoder, image_size=image_size,
                        num_classes=manifest.num_classes, max_failures=max_failures,
                        retry_s=float(retry_s),
                        counts=(dict(zip(manifest.urls, manifest.counts))
                                if manifest.counts else None),
                        register_s3=any(u.startswith("s3://") for u in manifest.urls))
        self.epoch, self.batches_done = epoch, 0
        self._raw = [0] * self.cfg["num_workers_logical"]
        self._worker_stats = [{} for _ in self._raw]
        self._stats_before = dict.fromkeys(_TOTALS, 0)  # earlier epochs
        self._last_log = 0.0
        make_decoder(decoder)  # fail here, not in a worker, on an unknown decoder

    def __len__(self) -> int:
        return self.batches_per_epoch

    @property
    def stats(self) -> dict:
        """corrupt_samples (skipped), shard_errors (shards that failed mid-way) and
        resized_samples (decoded at another size than the batch's), this run."""
        out = {k: self._stats_before.get(k, 0) for k in _TOTALS}
        for s in self._worker_stats:
            for total, counter in zip(_TOTALS, _COUNTERS):
                out[total] += s.get(counter, 0)
        return out

    def _layout(self) -> dict:
        c = self.cfg
        return {k: c[k] for k in ("seed", "world_size", "num_workers_logical", "batch_size",
                                  "shuffle_buffer")} | {"num_urls": len(c["urls"])}

    def state_dict(self) -> dict:
        """Everything needed to continue this rank's stream exactly (save one per rank)."""
        return {"epoch": self.epoch, "batches_done": self.batches_done, "raw": list(self._raw),
                "worker_stats": [dict(s) for s in self._worker_stats],
                "stats_before": dict(self._stats_before), "layout": self._layout()}

    def load_state_dict(self, state: dict):
        """Continue where `state` (from state_dict, e.g. a checkpoint's rank_state) stopped.
        Every field is checked first, against this loader's layout and epoch: a damaged or
        crafted state (raw=[10**9] made a worker skip samples for ever) is a ValueError naming
        the field."""
        _check_state(state, self.num_samples, self._layout())
        self.epoch = state["epoch"]
        self._stats_before = dict(state["stats_before"])
        if state["layout"] == self._layout():
            self.batches_done = state["batches_done"]
            self._raw = list(state["raw"])
            self._worker_stats = [dict(s) for s in state["worker_stats"]]
        else:
            # another world size / worker count / batch size: the exact stream cannot be
            # reproduced; continue at the same fraction of the epoch with a fresh order
            frac = state["batches_done"] / max(1, _batches_in(state["layout"], self.num_samples))
            self.batches_done = min(int(frac * self.batches_per_epoch), self.batches_per_epoch)
            self._raw = [0] * self.cfg["num_workers_logical"]
            log.warning("data loader resumed with a different layout (%s -> %s): continuing at "
                        "batch %d of epoch %d in another sample order", state.get("layout"),
                        self._layout(), self.batches_done, self.epoch)

    def set_epoch(self, epoch: int):
        _check_int("epoch", epoch, 0)
        self.epoch, self.batches_done = epoch, 0
        self._raw = [0] * self.cfg["num_workers_logical"]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        total, done = self.batches_per_epoch, self.batches_done
        if done < total:
            yield from self._run(total, done)
        self._end_epoch()

    def _run(self, total: int, done: int):
        nw = self.cfg["num_workers_logical"]
        rotation = done % nw
        share, taken = _per_worker(total, nw), _per_worker(done, nw)
        # indexed by logical worker; _RankStream maps physical worker ids onto them
        remaining = [share[w] - taken[w] for w in range(nw)]
        dataset = _RankStream(dict(self.cfg, epoch=self.epoch), rotation, remaining,
                              list(self._raw), [dict(s) for s in self._worker_stats])
        # Its own generator for the workers' base seed: a DataLoader without one draws it from
        # torch's global generator at every iterator start, so a resumed run's global stream
        # (dropout and the like) would drift from the uninterrupted run's.
        base = torch.Generator().manual_seed(
            stable_seed(self.cfg["seed"], self.epoch, self.cfg["rank"], "dataloader") % (1 << 62))
        kw = dict(batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                  generator=base)
        if self.num_workers > 0:
            kw.update(prefetch_factor=self.prefetch_factor, persistent_workers=False,
                      worker_init_fn=_worker_signals)
        batches = _iter_without_sigchld_errors(torch.utils.data.DataLoader(dataset, **kw))
        try:
            for item in _worker_deaths_named(batches):
                if isinstance(item, _WorkerError):
                    raise item.error
                images, labels, info = item
                w = info["worker"]
                self._raw[w] = info["raw"]
                self._worker_stats[w] = {k: info[k] for k in _COUNTERS}
                self.batches_done += 1
                self._maybe_log()
                yield images, labels
        finally:
            # stop the workers now: left to garbage collection (e.g. a traceback keeping the
            # iterator alive after an error) torch's shutdown waits 5 s per worker
            stop = getattr(batches, "_shutdown_workers", None)
            if stop is not None:
                stop()
        if self.batches_done != total:
            raise RuntimeError(f"rank {self.rank}: epoch {self.epoch} ended after "
                               f"{self.batches_done} of {total} batches")

    def _maybe_log(self, force: bool = False):
        s = self.stats
        if any(s.values()) and (force or time.monotonic() - self._last_log > 60):
            self._last_log = time.monotonic()
            log.warning("rank %d epoch %d: %d corrupt samples skipped, %d shard read errors, %d "
                        "images of another size resized so far", self.rank, self.epoch,
                        s["corrupt_samples"], s["shard_errors"], s["resized_samples"])

    def _end_epoch(self):
        self._maybe_log(force=True)
        self._stats_before = self.stats
        self._worker_stats = [{} for _ in self._raw]
        self.epoch += 1
        self.batches_done = 0
        self._raw = [0] * self.cfg["num_workers_logical"]


def _dead_worker_pids(batches, wait_s: float = 2.0) -> List[int]:
    """pids of the iterator's worker processes that have exited, waiting up to `wait_s` for a
    killed one to be reaped (right after a SIGKILL it can still look alive)."""
    workers = getattr(batches, "_workers", None) or []
    deadline = time.monotonic() + wait_s
    while True:
        dead = [w.pid for w in workers if not w.is_alive()]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def _worker_deaths_named(batches) -> Iterator:
    """The DataLoader's items; a worker that died is a LoaderError that says what usually kills
    one and what to do. torch says "DataLoader worker (pid(s) N) exited unexpectedly" when it
    sees the dead process; when the result pipe breaks first (the worker was killed mid-send)
    its ConnectionResetError / EOFError comes through as it is, and is named the same way."""
    try:
        yield from batches
        return
    except RuntimeError as e:
        if not str(e).startswith("DataLoader worker"):
            raise
        what = str(e)
    except (ConnectionError, EOFError) as e:
        dead = _dead_worker_pids(batches)
        if not dead:
            raise
        what = f"pid(s) {', '.join(map(str, dead))}: {type(e).__name__} on its result pipe"
    raise LoaderError(f"a data loader worker process died ({what}): killed from outside, most "
                      "often by the out-of-memory killer (see dmesg and the job's memory "
                      "limit; fewer data.num_workers or a smaller data.shuffle_buffer use "
                      "less), or crashed; resume from the last checkpoint") from None


def _batches_in(layout: dict, num_samples: int) -> int:
    return num_samples // (layout["world_size"] * layout["batch_size"])


def _per_worker(batches: int, num_workers: int) -> List[int]:
    """How many of the first `batches` batches each logical worker hands out: batch k comes
    from worker k % num_workers, so worker w's count is the length of piece w."""
    return [len(range(*split_span(batches, w, num_workers))) for w in range(num_workers)]


# A worker's counters as its batches report them (state["worker_stats"]), and the same counts
# as StreamStats fields, state["stats_before"] and ShardLoader.stats name them.
_COUNTERS = ("corrupt", "shard_errors", "resized")
_TOTALS = ("corrupt_samples", "shard_errors", "resized_samples")


def _check_state(state, num_samples: int, layout: dict):
    """ValueError naming the first field of a loader state that this loader cannot have
    written: a wrong type, a negative count, a position past the epoch, or a worker position
    (raw samples it consumed) other than its batches' samples plus the corrupt ones it skipped
    (the exact relation state_dict keeps). Corrupt samples beyond the epoch's sample count are
    refused too: a crafted count would make resume skip that many samples."""
    def bad(field, value, want):
        raise ValueError(f"data loader state (a checkpoint's rank_state): {field} is "
                         f"{str(value)[:80]}, {want}; the state is damaged or from another "
                         "dataset: resume from another checkpoint, or start the epoch over")

    def count(field, value, minimum=0, maximum=None):
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum or \
                (maximum is not None and value > maximum):
            bad(field, repr(value), f"expected an integer in [{minimum}, "
                                    f"{'...' if maximum is None else maximum}]")
        return value

    def counters(field, value, names, maximum=None):
        if not isinstance(value, dict) or set(value) - set(names):
            bad(field, repr(value), f"expected a mapping of {', '.join(names)}")
        for k, v in value.items():
            count(f"{field}[{k!r}]", v, 0, maximum)
        return value

    if not isinstance(state, dict):
        bad("the state", type(state).__name__, "expected a mapping")
    for k in ("epoch", "batches_done", "raw", "worker_stats", "stats_before", "layout"):
        if k not in state:
            bad(f"field {k!r}", "missing", "expected every field state_dict writes")
    count("epoch", state["epoch"])
    counters("stats_before", state["stats_before"], _TOTALS)
    saved = state["layout"]
    if not isinstance(saved, dict) or set(saved) != set(layout):
        bad("layout", repr(saved), f"expected the fields {sorted(layout)}")
    for k, v in saved.items():
        count(f"layout[{k!r}]", v, {"seed": -2 ** 63, "shuffle_buffer": 0}.get(k, 1))
    batches = count("batches_done", state["batches_done"], 0, _batches_in(saved, num_samples))
    if saved != layout:
        return  # only the epoch and its fraction done are used
    nw, size = layout["num_workers_logical"], layout["batch_size"]
    raw, stats = state["raw"], state["worker_stats"]
    if not isinstance(raw, list) or len(raw) != nw:
        bad("raw", repr(raw), f"expected a list of {nw} counts (one per worker)")
    if not isinstance(stats, list) or len(stats) != nw:
        bad("worker_stats", repr(stats), f"expected a list of {nw} mappings (one per worker)")
    for w, taken in enumerate(_per_worker(batches, nw)):
        counters(f"worker_stats[{w}]", stats[w], _COUNTERS, num_samples)
        corrupt = stats[w].get("corrupt", 0)
        if count(f"raw[{w}]", raw[w]) != taken * size + corrupt:
            bad(f"raw[{w}]", raw[w], f"but worker {w} handed out {taken} batches of {size} and "
                                     f"skipped {corrupt} corrupt samples: {taken * size + corrupt}")


def _check_int(name: str, value, minimum: int):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def make_loader(source: Union[str, Sequence[str]], batch_size: int, *,
                rank: Optional[int] = None, world_size: Optional[int] = None,
                num_workers: int = 2, shuffle_buffer: int = 1000, seed: int = 0, epoch: int = 0,
                samples_per_epoch: Optional[int] = None,
                image_size: Optional[Union[int, Tuple[int, int]]] = None,
                decoder: str = "auto", url_template: Optional[str] = None, check: bool = True,
                check_timeout: float = 10.0, pin_memory: bool = False,
                prefetch_factor: int = 2, retry_s: float = 20.0) -> ShardLoader:
    """A ShardLoader for this rank. `source`: see load_manifest. rank / world_size default to
    torch.distributed's when it is initialized, else 0 / 1 (pass them explicitly under a
    launcher that splits data differently). check: open shards first (check_shards).
    retry_s: how long a remote shard is retried after its connection fails (read_shards)."""
    if rank is None or world_size is None:
        dist = torch.distributed
        initialized = dist.is_available() and dist.is_initialized()
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        world_size = world_size if world_size is not None else (
            dist.get_world_size() if initialized else 1)
    manifest = load_manifest(source, url_template, timeout=check_timeout)
    if any(u.startswith("s3://") for u in manifest.urls):
        register_s3_handler()
    if check:
        check_shards(manifest.urls, timeout=check_timeout, seed=seed)
    return ShardLoader(manifest, batch_size, rank=rank, world_size=world_size,
                       num_workers=num_workers, shuffle_buffer=shuffle_buffer, seed=seed,
                       epoch=epoch, samples_per_epoch=samples_per_epoch, image_size=image_size,
                       decoder=decoder, pin_memory=pin_memory, prefetch_factor=prefetch_factor,
                       retry_s=retry_s)

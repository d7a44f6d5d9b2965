"""Data path: WebDataset tar shards for identity-classification training.

  * `convert` / `make_shards.py`: insightface RecordIO, image folders or `path label` lists ->
    tar shards (`KEY.jpg` original bytes + `KEY.cls`) + manifest.json, locally or on s3://.
  * `make_synthetic` / `make_synthetic.py`: a learnable synthetic identity dataset, same format.
  * `make_loader`: per-rank streaming loader (equal batches on every rank, seeded, resumable,
    corrupt samples counted) and `augment` (flip/normalize on the device).

Importing this package has no side effects; the s3:// handler is registered by make_loader (or
`register_s3_handler()`).
"""
from .decode import augment, available_decoders, make_decoder
from ..common import stable_seed
from .loader import (LoaderError, Manifest, ShardError, ShardLoader, check_shards,
                     load_manifest, make_loader)
from .recordio import IRHeader, RecordIOError, RecordIOFile, unpack_record
from ..common import parse_size
from .shards import ConvertPlan, convert
from .sources import FolderSource, ListSource, RecordIOSource, SourceError, open_source
from .storage import register_s3_handler
from .synthetic import (SyntheticSource, encode_jpeg, make_synthetic, synthetic_image,
                        synthetic_pairs)

__all__ = ["stable_seed", "augment", "available_decoders", "make_decoder", "LoaderError",
           "Manifest", "ShardError", "ShardLoader", "check_shards", "load_manifest",
           "make_loader", "IRHeader", "RecordIOError", "RecordIOFile", "unpack_record",
           "ConvertPlan", "convert", "parse_size", "FolderSource", "ListSource",
           "RecordIOSource", "SourceError", "open_source", "register_s3_handler",
           "SyntheticSource", "encode_jpeg", "make_synthetic", "synthetic_image",
           "synthetic_pairs"]

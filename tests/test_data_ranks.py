"""What each rank reads: per epoch, the ranks' samples are disjoint and together are the dataset;
corrupt samples are counted exactly, per rank. Shards are written by the test itself with a
unique label per sample (the label names the sample). Ranks are ShardLoaders with an explicit
rank / world_size in this process: the split is a pure function of them, no collective needed.
"""
import io
import json
import os
import tarfile

import pytest

from hybrid_fc.data import make_loader
from hybrid_fc.data.synthetic import encode_jpeg, synthetic_image


def _write_shards(d, n_shards, per, corrupt=()):
    """n_shards shards of `per` samples; sample i has label i. `corrupt`: positions inside every
    shard to spoil: 0 -> a JPEG cut short, 1 -> a label that is not a number."""
    os.makedirs(d, exist_ok=True)
    shards = []
    for s in range(n_shards):
        with tarfile.open(os.path.join(d, f"s{s}.tar"), "w") as tf:
            for k in range(per):
                i = s * per + k
                jpg = encode_jpeg(synthetic_image(i % 5, i, 16))
                cls = str(i).encode()
                if k in corrupt and k % 2 == 0:
                    jpg = jpg[:60]
                elif k in corrupt:
                    cls = b"abc"
                for ext, data in (("jpg", jpg), ("cls", cls)):
                    ti = tarfile.TarInfo(f"{i:05d}.{ext}")
                    ti.size = len(data)
                    tf.addfile(ti, io.BytesIO(data))
        shards.append({"url": f"s{s}.tar", "count": per})
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"num_samples": n_shards * per, "num_classes": n_shards * per,
                   "shards": shards}, f)
    return d


@pytest.mark.parametrize("num_workers", [0, 2])
def test_ranks_read_disjoint_samples_that_cover_the_dataset(tmp_path, num_workers):
    """4 shards x 12 samples on 2 ranks (x 2 workers: 4 consumers, one shard each per epoch), no
    shuffle buffer (its read-ahead would take a few samples of the next epoch's shard): in each
    of two epochs the ranks' label sets are disjoint, each rank's has no repeat, and their union
    is all 48 samples. Catches a rank split that hands every shard to every rank (planted:
    split_by_rank returning its input; the batch-count tests stayed green with it)."""
    d = _write_shards(str(tmp_path), 4, 12)
    loaders = [make_loader(d, 4, rank=r, world_size=2, num_workers=num_workers,
                           shuffle_buffer=0, seed=3) for r in range(2)]
    epochs = []
    for epoch in range(2):
        per_rank = [[v for _, y in loader for v in y.tolist()] for loader in loaders]
        assert [len(p) for p in per_rank] == [24, 24], (epoch, per_rank)
        a, b = map(set, per_rank)
        assert len(a) == len(b) == 24, (epoch, sorted(per_rank[0]), sorted(per_rank[1]))
        assert not a & b, (epoch, sorted(a & b))
        assert a | b == set(range(48)), epoch
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # another order (and shard assignment) in the next epoch


@pytest.mark.parametrize("num_workers", [1, 2])
def test_corrupt_samples_counted_exactly_on_two_ranks(tmp_path, num_workers):
    """4 shards x 10 samples with samples 0 (truncated JPEG) and 1 (label 'abc') of every shard
    corrupt, 2 ranks, batches of 4: each rank yields 40 // 8 = 5 batches = 20 good samples. A
    rank's stream is its 2 shards (2 corrupt + 8 good each) and then the first 6 samples of a
    shard of the next permutation (2 corrupt + 4 good): exactly 6 corrupt per rank, whichever
    shards it drew, with one worker or two (3 + 2 batches: 2 + 2 and 2). After a second epoch:
    12. Catches double counting (planted: the epoch end keeping the workers' counters it had
    just folded into the running total; the old `>= 3` assertion let it through)."""
    d = _write_shards(str(tmp_path), 4, 10, corrupt=(0, 1))
    bad = {s * 10 + k for s in range(4) for k in (0, 1)}
    for rank in range(2):
        loader = make_loader(d, 4, rank=rank, world_size=2, num_workers=num_workers,
                             shuffle_buffer=0, seed=1)
        for epoch in (1, 2):
            labels = [v for _, y in loader for v in y.tolist()]
            assert len(labels) == 20 and not set(labels) & bad, (rank, epoch, labels)
            stats = loader.stats
            assert (stats["corrupt_samples"], stats["shard_errors"]) == (6 * epoch, 0), \
                (rank, epoch, stats)
            assert loader.state_dict()["stats_before"]["corrupt_samples"] == 6 * epoch

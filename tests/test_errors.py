"""Bad input gets a clear error naming the problem, never a silently wrong loss."""
import pytest
import torch

from hybrid_fc import ArcFace, CosFace, PartialFC
from harness import run_ranks


def _head(**kw):
    return PartialFC(ArcFace(), 8, 20, **kw)


@pytest.mark.parametrize("labels, exc, match", [
    (torch.tensor([0, 20]), ValueError, r"1 label\(s\) outside \[0, 20\)"),
    (torch.tensor([-1, 3]), ValueError, r"outside \[0, 20\)"),
    (torch.tensor([0.0, 1.0]), TypeError, "labels must be an integer tensor"),
    (torch.tensor([True, False]), TypeError, "labels must be an integer tensor"),
    (torch.tensor([0, 1, 2]), ValueError, "3 labels for 2 embeddings"),
])
def test_bad_labels(labels, exc, match):
    with pytest.raises(exc, match=match):
        _head()(torch.randn(2, 8), labels)


@pytest.mark.parametrize("emb, exc, match", [
    (torch.randn(2, 7), ValueError, r"embeddings must be \(batch, 8\), got \(2, 7\)"),
    (torch.randn(2, 8, 1), ValueError, r"embeddings must be \(batch, 8\)"),
    (torch.tensor([[float("nan")] + [0.0] * 7, [1.0] * 8]), ValueError, "1 non-finite"),
    (torch.tensor([[float("inf")] * 8, [1.0] * 8]), ValueError, "8 non-finite"),
    (torch.ones(2, 8, dtype=torch.int32), TypeError, "floating"),
])
def test_bad_embeddings(emb, exc, match):
    with pytest.raises(exc, match=match):
        _head()(emb, torch.tensor([0, 1]))


@pytest.mark.parametrize("kw, match", [
    (dict(sample_rate=0.0), "sample_rate must be in"),
    (dict(sample_rate=1.5), "sample_rate must be in"),
    (dict(chunk_size=0), "chunk_size"),
])
def test_bad_head_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        _head(**kw)


def test_bad_constructor_types():
    with pytest.raises(TypeError, match="margin_loss"):
        PartialFC(torch.nn.CrossEntropyLoss(), 8, 20)
    with pytest.raises(ValueError, match="embedding_size"):
        PartialFC(ArcFace(), 0, 20)
    with pytest.raises(ValueError, match="num_classes"):
        PartialFC(ArcFace(), 8, -5)


def test_empty_global_batch():
    with pytest.raises(ValueError, match="global batch is empty"):
        _head()(torch.randn(0, 8), torch.zeros(0, dtype=torch.long))


def _too_few_classes(rank, world):
    try:
        PartialFC(CosFace(), 4, 1)
    except ValueError as e:
        return str(e)
    return None


def test_num_classes_below_world_size():
    msgs = run_ranks(2, _too_few_classes)
    assert all(m and "num_classes=1 is smaller than the world size 2" in m for m in msgs), msgs


def _one_rank_bad(rank, world):
    head = PartialFC(CosFace(), 4, 10)
    labels = torch.tensor([1, 99]) if rank == 1 else torch.tensor([1, 2])
    try:
        head(torch.randn(2, 4), labels)
    except ValueError as e:
        return str(e)
    return None


def test_bad_input_on_one_rank_raises_on_every_rank():
    # Raising only on the bad rank would leave the others hanging in the next collective.
    msgs = run_ranks(2, _one_rank_bad, timeout=60)
    assert all(m and m.startswith("rank 1: 1 label(s) outside [0, 10)") for m in msgs), msgs


def test_head_on_other_device_than_inputs_is_named():
    head = _head().to(torch.float64)
    head.weight.data = head.weight.data.float()
    meta = torch.device("meta")
    with pytest.raises(ValueError, match="move the head"):
        head(torch.randn(2, 8, device=meta), torch.tensor([0, 1], device=meta))


def _one_rank_bad_input(rank, world, kind):
    """Rank 1 passes bad input and stays alive (catches its own error); every rank must raise
    the same error at once instead of rank 0 blocking in a collective until the timeout."""
    head = PartialFC(CosFace(), 4, 10)
    emb, labels = torch.randn(2, 4), torch.tensor([1, 2])
    if rank == 1:
        if kind == "width":
            emb = torch.randn(2, 3)
        elif kind == "dtype":
            emb = emb.to(torch.int32)
        elif kind == "length":
            labels = torch.tensor([1, 2, 3])
        elif kind == "labels_dtype":
            labels = labels.float()
        elif kind == "not_a_tensor":
            emb = emb.tolist()
    try:
        head(emb, labels)
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


@pytest.mark.parametrize("kind, expected", [
    ("width", "ValueError: rank 1: embeddings must be (batch, 4), got (2, 3)"),
    ("dtype", "TypeError: rank 1: embeddings must be a floating tensor, got torch.int32"),
    ("length", "ValueError: rank 1: 3 labels for 2 embeddings"),
    ("labels_dtype", "TypeError: rank 1: labels must be an integer tensor, got torch.float32"),
    ("not_a_tensor", "TypeError: rank 1: PartialFC.forward takes (embeddings, labels) tensors"),
])
def test_bad_shape_or_type_on_one_rank_raises_the_same_error_on_every_rank(kind, expected):
    import time
    t = time.time()
    msgs = run_ranks(2, _one_rank_bad_input, kind, timeout=60)
    assert msgs == [expected, expected], msgs
    assert time.time() - t < 30   # no rank waited for a collective timeout


def _mismatch_worker(rank, world):
    errors = []
    head = PartialFC(ArcFace(), 8, 20 + rank)      # rank 1 built with another class count
    try:
        head(torch.randn(2, 8), torch.tensor([0, 1]))
    except ValueError as exc:
        errors.append(str(exc))
    head = PartialFC(ArcFace(), 8, 20)
    x = torch.randn(2, 8).to(torch.bfloat16 if rank == 1 else torch.float32)
    try:                                           # bf16 embeddings on one rank only
        head(x, torch.tensor([0, 1]))
    except TypeError as exc:
        errors.append(str(exc))
    return errors


def test_ranks_must_agree_on_the_head_and_the_dtype():
    """Bugs caught: PartialFC built with another num_classes on one rank left a class on no
    rank (silently); bf16 embeddings on one rank only aborted gloo (SIGABRT)."""
    for errors in run_ranks(2, _mismatch_worker, timeout=60):
        assert len(errors) == 2, errors
        assert "rank 1 built PartialFC with num_classes=21" in errors[0]
        assert "rank 0: float32, rank 1: bfloat16" in errors[1].replace("torch.", "")

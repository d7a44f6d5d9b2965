"""Export a trained model: plain fp32 backbone state dict, ONNX, gathered class centers.

Sources of the backbone weights, in order:
  1. `TAG/hybrid/backbone.pt`, written by hybrid_fc.training.checkpoint at every save: the full fp32
     master weights and buffers keyed by parameter name, whatever the ZeRO stage and the
     number of ranks (no gathering needed here).
  2. A plain DeepSpeed checkpoint (`*_model_states.pt` + ZeRO optimizer partitions): rebuilt
     with deepspeed.utils.zero_to_fp32 (ZeRO 1/2/3 partitions consolidated on the CPU).
The backbone architecture comes from the experiment config saved with the checkpoint
(client_state["experiment"]["model"], or the run's config.json), or is given explicitly.

ONNX: traced with a dynamic batch dimension ("batch"), input `images` (B, 3, S, S) float32
normalized as in training, output `embeddings` (B, D) (not normalized). Before tracing,
torch.export checks that the forward has no data-dependent control flow and no branch on the
batch size (a tracer would silently bake one branch in); after writing, onnxruntime runs the
file at other batch sizes than the traced one and the L2-normalized embeddings must match
PyTorch's within `atol` (default 1e-4: fp32 kernels with different summation orders differ by
~1e-6 relative per layer; 1e-4 on unit vectors leaves a wide margin and still catches a wrong
graph, whose error is O(1)).

Class centers: the head shards `hybrid/head-rank*.pt` concatenated by their class ranges into
one (C, D) fp32 matrix (bf16 widened, int8 codes decoded with their row scales), written
through a memory map (C x D x 4 bytes; never all in RAM).
"""
import contextlib
import copy
import json
import logging
import os
import warnings
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..head.precision import weight_code
from ..runtime import join_process_group, starting_up
from ..training.checkpoint import (CheckpointError, backbone_file, deepspeed_model_states,
                                   head_shards, load_file, model_config, read_meta,
                                   resolve_checkpoint)

__all__ = ["CheckpointError", "OnnxExportError", "resolve_checkpoint", "load_backbone_weights",
           "load_backbone", "load_for_inference", "save_backbone", "export_class_centers",
           "export_onnx", "check_onnx", "import_factory", "add_checkpoint_args",
           "model_overrides", "OnnxBackbone", "load_onnx_for_inference"]

_EXPORT_ROWS = 1 << 16  # centers decoded this many rows at a time (16 MB of fp32 at D=64)

class OnnxExportError(RuntimeError):
    """The backbone cannot be exported to ONNX with a dynamic batch, or the file disagrees
    with PyTorch."""


def _fp32(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Floating tensors to fp32 (bf16 buffers under `data_types.buffer_dtype`), ints kept."""
    return {k: (v.float() if v.is_floating_point() else v).detach().clone()
            for k, v in sd.items()}


def load_backbone_weights(path: str, tag: Optional[str] = None, trust_checkpoint: bool = False
                          ) -> Tuple[Dict[str, torch.Tensor], Optional[Dict[str, Any]], str]:
    """The backbone's fp32 state dict from a training checkpoint (any ZeRO stage, any number of
    ranks), the saved model config (or None), and which file it came from.

    hybrid/backbone.pt is read as data only. A plain DeepSpeed checkpoint (no hybrid/ folder) can
    only be read by unpickling DeepSpeed's files, which runs whatever a crafted file holds: that
    needs trust_checkpoint=True (--trust-checkpoint). Raises CheckpointError when the checkpoint
    holds no backbone."""
    save_dir, tag = resolve_checkpoint(path, tag)
    folder = os.path.join(save_dir, tag)
    portable = backbone_file(save_dir, tag)
    if os.path.isfile(portable):
        state = load_file(portable)
        params = state.get("params") if isinstance(state, dict) else None
        if not params:
            raise CheckpointError(f"checkpoint without a backbone: {portable} has no "
                                  "'params' (not written by hybrid_fc.training.checkpoint?)")
        sd = dict(params)
        sd.update(state.get("buffers") or {})
        return _fp32(sd), model_config(save_dir, state.get("client_state")), portable
    states = deepspeed_model_states(folder)
    if states and not trust_checkpoint:
        raise CheckpointError(f"{folder} has no hybrid/backbone.pt, only DeepSpeed's own files, "
                              "which can only be read by unpickling them (a crafted file runs "
                              "code): pass --trust-checkpoint (trust_checkpoint=True) if you "
                              "trust this checkpoint")
    if states:
        # A plain DeepSpeed checkpoint: consolidate the ZeRO partitions (reads every rank's
        # optimizer file; CPU memory ~ 2x the fp32 model).
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(save_dir, tag)
        client = torch.load(states[0], map_location="cpu", weights_only=False)
        if not sd:
            raise CheckpointError(f"checkpoint without a backbone: {folder}'s DeepSpeed files "
                                  "hold no model parameters")
        return _fp32(sd), model_config(save_dir, client), states[0]
    raise CheckpointError(f"checkpoint without a backbone: {folder} has neither "
                          "hybrid/backbone.pt nor DeepSpeed *_model_states.pt files")


def import_factory(spec: str):
    """The callable named by `module:factory` (e.g. `mynets.faces:make_backbone`), for a
    backbone outside the registry. Given on the command line only (--model): a name read from
    a checkpoint or a JSON file is never imported (that would let a file choose code to run)."""
    import importlib
    module, _, attr = str(spec).partition(":")
    if not module or not attr:
        raise ValueError(f"--model {spec!r}: expected module:factory, e.g. "
                         "mynets.faces:make_backbone (a callable returning the nn.Module)")
    try:
        obj = importlib.import_module(module)
    except ImportError as exc:
        raise ValueError(f"--model {spec!r}: cannot import {module!r} ({exc}); is its folder "
                         "on PYTHONPATH?") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"--model {spec!r}: {module!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"--model {spec!r}: {attr!r} is not callable")
    return obj


def add_checkpoint_args(parser, checkpoint_help: str = "run folder, tag folder or backbone.pt",
                        onnx: bool = False) -> None:
    """The arguments every script that reads a trained backbone takes (eval, export, extract):
    where the checkpoint is, and the model it holds when its saved config does not say.
    onnx: `--onnx model.onnx` is accepted instead of --checkpoint (exactly one of the two)."""
    if onnx:
        source = parser.add_mutually_exclusive_group(required=True)
        source.add_argument("--checkpoint", help=checkpoint_help)
        source.add_argument("--onnx", metavar="MODEL.onnx",
                            help="an ONNX embedding model instead of a checkpoint (run with "
                                 "onnxruntime on the CPU): one exported by launch/export.py or "
                                 "any insightface-style model (NCHW RGB input)")
    else:
        parser.add_argument("--checkpoint", required=True, help=checkpoint_help)
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the run's latest)")
    parser.add_argument("--backbone", default=None,
                        help="registry backbone name: overrides / supplies the saved model config")
    parser.add_argument("--model", default=None, metavar="MODULE:FACTORY",
                        help="your own backbone outside the registry: MODULE:FACTORY() returns "
                             "the nn.Module to load the weights into (MODULE importable, e.g. "
                             "on PYTHONPATH)")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="overrides / supplies the saved model config")
    parser.add_argument("--input-size", "--image-size", type=int, default=None,
                        dest="input_size",
                        help="side of the square input images (default: the saved model config)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow reading DeepSpeed's own checkpoint files when there is no "
                             "hybrid/backbone.pt: they are unpickled, so a crafted file runs code")
    parser.add_argument("--local_rank", type=int, default=None,
                        help="set by the deepspeed launcher")


def model_overrides(args) -> Dict[str, Any]:
    """load_backbone's keyword arguments from the arguments of add_checkpoint_args."""
    return dict(model=args.model, backbone=args.backbone, embedding_size=args.embedding_size,
                input_size=args.input_size)


def _read_model_json(path: str) -> Optional[Dict[str, Any]]:
    """The model config written beside an exported backbone.pt (None when there is none),
    checked: a JSON object whose known fields have their types; errors name the file."""
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            cfg = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path}: expected a JSON object with backbone, embedding_size, "
                              f"input_size, got {type(cfg).__name__}")
    for key, kind, what in (("backbone", str, "a name"), ("embedding_size", int, "an integer"),
                            ("input_size", int, "an integer"), ("backbone_kwargs", dict,
                                                                "a mapping")):
        if key in cfg and (not isinstance(cfg[key], kind) or isinstance(cfg[key], bool)):
            raise CheckpointError(f"{path}: {key} must be {what}, got {cfg[key]!r:.80}")
    return cfg


def load_backbone(path: str, tag: Optional[str] = None, trust_checkpoint: bool = False,
                  model: Optional[str] = None, **model_overrides
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """(fp32 backbone in eval mode with the checkpoint's weights, its model config).

    `path`: a training checkpoint (see resolve_checkpoint) or a state dict written by
    save_backbone (`backbone.pt` with `backbone.json` beside it). model_overrides (backbone,
    embedding_size, input_size, backbone_kwargs) replace or supply the saved model config.
    model: `module:factory` of your own backbone (the README's "your own DeepSpeed model"
    path): factory() builds the module the weights are loaded into; the registry is not used."""
    from hybrid_fc.backbones import build_backbone
    if os.path.isfile(path):
        sd = load_file(path)  # data only; a crafted or truncated file is a CheckpointError
        if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                               for k, v in sd.items()):
            raise CheckpointError(f"{path}: not a state dict (a mapping of parameter names to "
                                  "tensors, as launch/export.py writes)")
        cfg = _read_model_json(os.path.splitext(path)[0] + ".json")
        source = path
    else:
        sd, cfg, source = load_backbone_weights(path, tag, trust_checkpoint)
    cfg = dict(cfg or {})
    cfg.update({k: v for k, v in model_overrides.items() if v is not None})
    cfg.setdefault("input_size", 112)
    cfg.setdefault("backbone_kwargs", {})
    if model is not None:
        net = import_factory(model)()
        if not isinstance(net, nn.Module):
            raise ValueError(f"--model {model!r} returned {type(net).__name__}, not an "
                             "nn.Module")
        cfg["backbone"] = str(model)
    else:
        missing = [k for k in ("backbone", "embedding_size") if k not in cfg]
        if missing:
            raise CheckpointError(f"{source}: no saved model config; pass {missing} (e.g. "
                                  "--backbone iresnet50 --embedding-size 512), or --model "
                                  "module:factory for a backbone outside the registry")
        net = build_backbone(cfg["backbone"], int(cfg["embedding_size"]),
                             input_size=int(cfg["input_size"]), **cfg["backbone_kwargs"])
    try:
        net.load_state_dict(sd, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{source}: the weights do not fit backbone {cfg['backbone']!r} "
                              f"(embedding_size={cfg.get('embedding_size')}): {exc}") from None
    return net.float().eval(), cfg


def _check_input_size(net: nn.Module, size: int, name: str, source: str) -> None:
    """One forward of a (2, 3, size, size) zero batch (eval mode): a model built for another
    input size fails here with a line naming it, not deep inside eval's batches or as a
    misleading ONNX tracing error."""
    try:
        with torch.no_grad():
            net(torch.zeros(2, 3, size, size))
    except Exception as exc:  # noqa: BLE001 - any failure of the probe means the same thing
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        raise CheckpointError(f"{source}: backbone {name!r} does not take {size} x {size} "
                              f"images ({type(exc).__name__}: {first}); give its input size "
                              "with --input-size (the checkpoint does not say it)") from None


def load_for_inference(path: str, tag: Optional[str] = None, trust_checkpoint: bool = False,
                       **model_overrides) -> Tuple[nn.Module, Dict[str, Any]]:
    """load_backbone on this process's device, for launch/eval.py and launch/extract.py.

    Under a launcher (deepspeed / torchrun: WORLD_SIZE > 1 in the environment) it first joins
    the process group (deepspeed.init_distributed reads the launcher's variables) and uses the
    GPU LOCAL_RANK when there are GPUs; alone it stays single-process."""
    _join_if_launched()
    model, cfg = load_backbone(path, tag, trust_checkpoint, **model_overrides)
    _check_input_size(model, int(cfg["input_size"]), cfg["backbone"], path)
    device = (torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
              if torch.cuda.is_available() else torch.device("cpu"))
    return model.to(device), cfg


def _join_if_launched() -> None:
    """Under a launcher (WORLD_SIZE > 1) join its process group; alone, nothing."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        with starting_up():  # DeepSpeed's CPU op is built or loaded in here
            join_process_group(standalone=False)


def save_backbone(path: str, out: str, tag: Optional[str] = None, trust_checkpoint: bool = False,
                  **model_overrides) -> str:
    """Write the plain fp32 state dict (`torch.load` + `load_state_dict` on the model built by
    hybrid_fc.backbones.build_backbone) to `out` and the model config to `out`'s .json."""
    model, cfg = load_backbone(path, tag, trust_checkpoint, **model_overrides)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(model.state_dict(), out)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump(cfg, f, indent=1)
    return out


# -- class centers -----------------------------------------------------------------------------
def export_class_centers(path: str, out: Optional[str] = None, tag: Optional[str] = None,
                         report=None):
    """The (C, D) fp32 class-center matrix: head shards concatenated by class range.

    With `out` (a .npy path) it is written through a memory map and the path is returned;
    without, the tensor is returned (for small heads). Centers stored in bf16
    (head.weight_dtype=bfloat16) are widened to fp32 exactly, int8 codes are decoded with their
    row scales (code x scale / 127 per row, in fp32), a block of rows at a time; `report` (e.g.
    print) is told the stored dtype when it is not fp32."""
    save_dir, tag = resolve_checkpoint(path, tag)
    if not os.path.isdir(os.path.join(save_dir, tag, "hybrid")):
        raise CheckpointError(f"{os.path.join(save_dir, tag)} has no hybrid/ folder: not a "
                              "hybrid_fc checkpoint, so it holds no head shards")
    meta = read_meta(save_dir, tag)
    C, D = int(meta["num_classes"]), int(meta["embedding_size"])
    tmp = None
    if out is not None:  # written under a temporary name: a failure leaves no loadable file
        os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
        tmp = f"{out}.tmp.{os.getpid()}.npy"
        centers = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(C, D))
    else:
        centers = np.empty((C, D), np.float32)
    stored = set()
    try:
        for shard, lo, hi in head_shards(save_dir, tag, meta, 0, C):
            code = weight_code(shard["weight"].dtype)
            parts = {"": shard["weight"], "_scale": shard.get("weight_scale")}
            s = shard["class_start"]
            for a in range(lo, hi, _EXPORT_ROWS):  # fp32 temporaries of one block only
                b = min(hi, a + _EXPORT_ROWS)
                centers[a:b] = code.decode({k: parts[k][a - s:b - s] for k in code.parts}
                                           ).numpy()
            stored.add(str(shard["weight"].dtype).replace("torch.", ""))
        if tmp is not None:
            centers.flush()
            del centers
            os.replace(tmp, out)
    except BaseException:
        if tmp is not None:
            try:
                os.remove(tmp)
            except OSError:
                pass
        raise
    if report is not None and stored != {"float32"}:
        how = {"bfloat16": "every bf16 value is exactly an fp32 value",
               "int8": "int8 codes decoded with their per-row fp32 scales"}
        report(f"class centers: stored as {', '.join(sorted(stored))} in the checkpoint, "
               f"written as float32 ({'; '.join(how[d] for d in sorted(stored) if d in how)})")
    if out is not None:
        return out
    return torch.from_numpy(centers)


# -- ONNX -------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_torch_export():
    """torch.export logs the whole graph on a failed guard; the error says enough."""
    names = ("torch.fx.experimental.symbolic_shapes", "torch._dynamo", "torch.export",
             "torch._export")
    saved = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for n, level in saved.items():
            logging.getLogger(n).setLevel(level)


def _check_traceable(model: nn.Module, example: torch.Tensor) -> None:
    """Raise OnnxExportError when the forward branches on tensor values or on the batch size."""
    name = type(model).__name__
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_torch_export(), torch.no_grad():
            torch.export.export(model, (example,), dynamic_shapes=({0: batch},), strict=False)
    except Exception as exc:  # GuardOnDataDependentSymNode, UserError (constraint violation)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OnnxExportError(
            f"backbone {name} cannot be exported to ONNX with a dynamic batch: its forward has "
            f"data-dependent control flow (a Python `if`/loop on tensor values) or depends on "
            f"the batch size, which a traced graph would freeze to one case. Rewrite it with "
            f"torch.where / torch.cond, or export a model without it. torch.export said: "
            f"{type(exc).__name__}: {first}") from None


def export_onnx(model: nn.Module, out: str, input_size: int, *, opset: int = 17,
                check: bool = True, batch_sizes: Sequence[int] = (1, 3), atol: float = 1e-4
                ) -> Dict[str, Any]:
    """Write `model` (a copy in fp32 eval mode) as ONNX with a dynamic batch dimension.

    Returns {"path", "opset", "max_abs_diff" (None without check), "batch_sizes"}.
    Cost: torch.export + one trace (~3 s + ~7 s for iresnet50 on one CPU core) and, with check,
    onnxruntime runs at each batch size."""
    model = copy.deepcopy(model).float().eval()
    _check_input_size(model, input_size, type(model).__name__, out)
    g = torch.Generator().manual_seed(0)
    example = torch.randn(2, 3, input_size, input_size, generator=g)
    _check_traceable(model, example)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript-based exporter (dynamo=False) needs only `onnx`; the dynamo exporter
        # would also need onnxscript. A tracer warning means the trace may be wrong: an error.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("error", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(model, (example,), out, dynamo=False, opset_version=opset,
                              input_names=["images"], output_names=["embeddings"],
                              dynamic_axes={"images": {0: "batch"}, "embeddings": {0: "batch"}},
                              do_constant_folding=True)
        except torch.jit.TracerWarning as exc:
            raise OnnxExportError(f"backbone {type(model).__name__}: the ONNX trace may not "
                                  f"generalize to other inputs: {exc}") from None
    diff = check_onnx(out, model, input_size, batch_sizes, atol) if check else None
    return {"path": out, "opset": opset, "max_abs_diff": diff, "batch_sizes": list(batch_sizes)}


def check_onnx(path: str, model: nn.Module, input_size: int,
               batch_sizes: Sequence[int] = (1, 3), atol: float = 1e-4) -> float:
    """Run the ONNX file with onnxruntime at each batch size and compare the L2-normalized
    embeddings with PyTorch's; returns the largest absolute difference, raises OnnxExportError
    above `atol` or when a batch size is refused (the batch was not dynamic)."""
    import onnxruntime as ort
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    model = model.float().eval()
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for b in batch_sizes:
        x = torch.randn(b, 3, input_size, input_size, generator=g)
        try:
            got = session.run(["embeddings"], {"images": x.numpy()})[0]
        except Exception as exc:
            raise OnnxExportError(f"{path}: onnxruntime failed at batch size {b} (is the batch "
                                  f"dimension dynamic?): {exc}") from None
        with torch.no_grad():
            ref = model(x)
        if tuple(got.shape) != tuple(ref.shape):
            raise OnnxExportError(f"{path}: output shape {got.shape} at batch {b}, PyTorch "
                                  f"gives {tuple(ref.shape)}")
        a = torch.nn.functional.normalize(torch.from_numpy(got).double(), dim=1)
        r = torch.nn.functional.normalize(ref.double(), dim=1)
        worst = max(worst, float((a - r).abs().max()))
    if worst > atol:
        raise OnnxExportError(f"{path}: onnxruntime embeddings differ from PyTorch by {worst:.3g} "
                              f"(normalized, max abs) > atol {atol:g}")
    return worst


class OnnxBackbone(nn.Module):
    """An ONNX embedding model as a backbone: (B, 3, S, S) float32 normalized as in training ->
    (B, D) float32, run by onnxruntime on the CPU. No parameters: the evaluation code
    (embed_images, evaluate, evaluate_ijb) runs on it unchanged.

    Input: the first graph input, NCHW RGB. Its pixel normalization is found the way
    insightface's ONNX evaluation (arcface_torch/onnx_helper.py, the ICCV21-MFR checker) finds
    it: `pixel_norm.txt` beside the model (two lines: mean, std), else a graph that starts with
    Sub and Mul nodes (MXNet-converted models) normalizes itself (mean 0, std 1), else
    (x - 127.5) / 127.5, which is this project's convention (launch/export.py's files). The size
    S comes from the input's static H = W, or `input_size` when they are dynamic. A static batch
    dimension is served in chunks of that size. Threads: torch's (OMP_NUM_THREADS) per rank."""

    def __init__(self, path: str, input_size: Optional[int] = None):
        super().__init__()
        try:
            import onnx
            import onnxruntime as ort
        except ImportError as exc:
            raise ValueError(f"--onnx needs onnx and onnxruntime (pip install onnx onnxruntime): "
                             f"{exc}") from None
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ONNX model {path} does not exist")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(path, options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own error types: not an ONNX file, bad graph
            raise ValueError(f"{path}: onnxruntime cannot load it: {exc}") from None
        inp, outputs = self.session.get_inputs()[0], self.session.get_outputs()
        shape = list(inp.shape)
        if len(shape) != 4 or shape[1] != 3:
            raise ValueError(f"{path}: input {inp.name!r} has shape {shape}, expected "
                             "(batch, 3, H, W)")
        h, w = shape[2:]
        static = isinstance(h, int) and isinstance(w, int)
        if static and (h != w or (input_size is not None and input_size != h)):
            raise ValueError(f"{path}: input {inp.name!r} is {h}x{w}; expected a square input"
                             + (f" of --input-size {input_size}" if input_size else ""))
        if not static and input_size is None:
            raise ValueError(f"{path}: input {inp.name!r} has dynamic height/width {shape[2:]}: "
                             "pass --input-size")
        self.input_size = int(h) if static else int(input_size)
        self.input_name, self.output_name = inp.name, outputs[0].name
        self.batch = shape[0] if isinstance(shape[0], int) else None
        dim = outputs[0].shape[-1] if len(outputs[0].shape) == 2 else None
        self.embedding_size = dim if isinstance(dim, int) else None
        norm_file = os.path.join(os.path.dirname(os.path.abspath(path)), "pixel_norm.txt")
        if os.path.isfile(norm_file):
            with open(norm_file) as f:
                text = f.read()
            try:
                self.mean, self.std = (float(x) for x in text.split())
            except ValueError:
                raise ValueError(f"{norm_file}: expected two numbers (mean, std)") from None
        else:
            first = [n.name for n in onnx.load(path, load_external_data=False).graph.node[:8]]
            builtin = (any(n.startswith(("Sub", "_minus")) for n in first)
                       and any(n.startswith(("Mul", "_mul")) for n in first))
            self.mean, self.std = (0.0, 1.0) if builtin else (127.5, 127.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Cost: one onnxruntime run per call (per chunk of a static batch) and two host
        copies of the batch."""
        arr = x.detach().float().cpu().numpy()                 # (B, 3, S, S), (p - 127.5) / 127.5
        if (self.mean, self.std) != (127.5, 127.5):
            arr = (arr * 127.5 + 127.5 - self.mean) / self.std
        step = self.batch or len(arr)
        outs = []
        for s in range(0, len(arr), step):
            chunk = arr[s:s + step]
            if len(chunk) < step:                               # a static batch: pad the last
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk),) + chunk.shape[1:],
                                                        chunk.dtype)])
            out = self.session.run([self.output_name], {self.input_name: chunk})[0]
            outs.append(out[:len(arr) - s])
        return torch.from_numpy(np.concatenate(outs)).to(x.device)


def load_onnx_for_inference(path: str, input_size: Optional[int] = None
                            ) -> Tuple[OnnxBackbone, Dict[str, Any]]:
    """An OnnxBackbone and its model config ({"backbone": "onnx:<file>", "input_size",
    "embedding_size"}), after joining the launcher's process group like load_for_inference."""
    _join_if_launched()
    model = OnnxBackbone(path, input_size)
    return model, {"backbone": f"onnx:{os.path.basename(path)}", "input_size": model.input_size,
                   "embedding_size": model.embedding_size}

"""Compressing a fine-tuned model: pruning, int8 quantization, and what a compressed model is
judged by (accuracy, size on disk, CPU latency, parameters, MACs). The phase that uses them is
trainables/phases/compress.py.

- Unstructured pruning: global magnitude (L1) over the weights of the conv and linear layers
  outside the head, an exact count (``torch.nn.utils.prune.global_unstructured``: the
  ``round(sparsity * N)`` smallest ``|w|`` of the ``N``), made permanent at once so the model
  keeps its parameter names; the masks are returned, and ``apply_masks`` after every optimizer
  step keeps the pruned weights at zero while the model recovers.
- Structured pruning: output channels, with Torch-Pruning's dependency graph (the layers a
  channel couples, residual adds and depthwise convolutions included), the same share of each
  coupled group by L2 magnitude (uniform: the pruned shapes depend on the ratio alone, so a
  resumed trial that prunes its rebuilt model gets the same shapes back), the head left whole.
- Quantization, with torchao (``torch.ao.quantization`` is deprecated): ``dynamic`` int8 weights
  and per-token int8 activations for ``nn.Linear`` only (a CNN keeps its convolutions in float:
  only its classifier shrinks); ``static``: the PT2E flow (``torch.export`` with a dynamic batch,
  ``X86InductorQuantizer``, calibration on training images, ``convert_pt2e``), then lowered to
  oneDNN's int8 kernels on x86 (the converted graph alone runs quantize / dequantize around
  float ops: smaller, not faster).

Size on disk is the length of ``torch.save(state_dict)``: for a static model, the converted
graph's tensors (int8 weights, their scales and zero points, float biases); the float weights it
no longer reads are dropped first. Latency is on the CPU with the process's torch threads, the
median over ``repeats`` runs after two warm-up runs, on normal noise at the model's input size.
"""
from __future__ import annotations

import copy
import io
import platform
import statistics
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


# --------------------------------------------------------------------------- pruning


def prunable_weights(model: nn.Module, exclude: Sequence[str] = ()) -> Dict[str, nn.Parameter]:
    """The weights of ``model``'s conv and linear layers by parameter name, except those of the
    modules named in ``exclude`` (the head) and below them."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, PRUNABLE) and not any(name == e or name.startswith(e + ".") for e in exclude):
            out[f"{name}.weight" if name else "weight"] = module.weight
    return out


def prune_unstructured(model: nn.Module, sparsity: float, exclude: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """Zero the ``sparsity`` share of the prunable weights with the smallest magnitude, ranked over
    all of them at once; returns the masks (True: kept) by parameter name."""
    from torch.nn.utils import prune

    weights = prunable_weights(model, exclude)
    owners = [(model.get_submodule(n.rpartition(".")[0]), "weight") for n in weights]
    if sparsity > 0:
        prune.global_unstructured(owners, pruning_method=prune.L1Unstructured, amount=float(sparsity))
    masks = {}
    for n, (module, attr) in zip(weights, owners):
        if prune.is_pruned(module):
            masks[n] = module.weight_mask.bool()
            prune.remove(module, attr)  # permanent: the parameter is ``weight`` again, zeros in it
        else:
            masks[n] = torch.ones_like(module.weight, dtype=torch.bool)
    return masks


@torch.no_grad()
def apply_masks(params: Dict[str, torch.Tensor], masks: Dict[str, torch.Tensor]) -> None:
    """Put the pruned weights back to zero (after an optimizer step: momentum and weight decay
    would move them)."""
    for n, m in masks.items():
        params[n].mul_(m)


def zero_share(model: nn.Module, exclude: Sequence[str] = ()) -> float:
    """The share of zeros among the prunable weights (what unstructured pruning reached)."""
    weights = list(prunable_weights(model, exclude).values())
    total = sum(w.numel() for w in weights)
    return sum(int((w == 0).sum()) for w in weights) / max(total, 1)


def prune_structured(model: nn.Module, ratio: float, example: torch.Tensor, ignored: Sequence[str] = ()) -> None:
    """Remove the ``ratio`` share of the channels of every group of coupled layers (Torch-Pruning's
    dependency graph), the lowest L2 magnitude first, leaving the modules named in ``ignored``
    (the head) whole. The model changes in place (new parameters: build optimizers after)."""
    import torch_pruning as tp

    if ratio <= 0:
        return
    was_training = model.training
    model.eval()  # tracing must not move BN's running statistics
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():  # the graph is traced through autograd: a frozen layer would be invisible
        p.requires_grad_(True)
    name = type(model).__name__
    try:
        keep = [model.get_submodule(n) for n in ignored]
        pruner = tp.pruner.MetaPruner(model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=float(ratio), ignored_layers=keep)
        pruner.step()
        with torch.no_grad():
            out = model(torch.cat([example, example]))
    except Exception as e:  # Torch-Pruning traces the model: attention's heads, custom ops may not follow
        raise RuntimeError(f"structured pruning of {name} failed ({type(e).__name__}: {e}); "
                           "use prune: unstructured for this model") from e
    if not torch.is_tensor(out) or out.shape[0] != 2 * example.shape[0]:
        raise RuntimeError(f"structured pruning left {name} without a batch of outputs; use prune: unstructured")
    for n, p in model.named_parameters():  # pruned layers hold new parameters: their flags by name
        p.requires_grad_(flags[n])
    model.train(was_training)


def shapes(model: nn.Module) -> Dict[str, List[int]]:
    """Every parameter's and buffer's shape: what a pruned structure must match to load weights."""
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def macs_and_params(model: nn.Module, example: torch.Tensor) -> Tuple[float, float]:
    """Multiply-accumulates of one forward pass on ``example`` and the parameter count
    (Torch-Pruning's counter, on a copy)."""
    import torch_pruning as tp

    macs, params = tp.utils.count_ops_and_params(model, example)
    return float(macs), float(params)


# --------------------------------------------------------------------------- quantization


def quantize(model: nn.Module, mode: str, calibration: Callable[[], Iterable[torch.Tensor]],
             example: torch.Tensor) -> Tuple[nn.Module, Dict[str, torch.Tensor]]:
    """An int8 copy of the float CPU ``model``: the module that runs (on the CPU) and the tensors
    that store it. ``calibration()`` yields normalised input batches (static only); ``example`` is
    an input batch of two or more images (traced with a dynamic batch)."""
    model = copy.deepcopy(model).cpu().eval()
    if mode == "dynamic":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantize_(model, Int8DynamicActivationInt8WeightConfig())  # nn.Linear only, in place
        return model, model.state_dict()
    if mode != "static":
        raise ValueError(f"quantize: {mode!r} is not one of none, dynamic, static")
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    batch = ({0: torch.export.Dim.AUTO},)
    graph = torch.export.export(model, (example.cpu(),), dynamic_shapes=batch).module()
    quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for x in calibration():
            prepared(x.cpu())
    converted = convert_pt2e(prepared)
    _drop_unread(converted)
    stored = converted.state_dict()
    if platform.machine().lower() in ("x86_64", "amd64"):
        return _lower_x86(converted, example.cpu(), batch), stored
    return converted, stored


def _drop_unread(graph: torch.fx.GraphModule) -> None:
    """Delete the tensors the converted graph no longer reads (the float weights its int8 copies
    replaced), so its state dict is what it runs on."""
    graph.graph.eliminate_dead_code()
    graph.recompile()
    read = {n.target for n in graph.graph.nodes if n.op == "get_attr"}
    for k in list(graph.state_dict()):
        if k not in read:
            owner, _, attr = k.rpartition(".")
            delattr(graph.get_submodule(owner) if owner else graph, attr)


def _lower_x86(converted: torch.fx.GraphModule, example: torch.Tensor, dynamic_shapes) -> nn.Module:
    """The quantize / dequantize patterns fused into oneDNN's int8 kernels: torchao's
    ``lower_pt2e_quantized_to_x86``, with the batch kept dynamic (it re-exports with a fixed one)."""
    from torch._export.utils import _is_cia_op
    from torch._inductor.constant_folding import constant_fold
    from torch._inductor.fx_passes.freezing_patterns import freezing_passes

    table = torch.export.default_decompositions()
    for op in list(table):
        if not _is_cia_op(op):  # post-autograd: only composite ops decompose
            del table[op]
    lowered = torch.export.export(converted, (example,), dynamic_shapes=dynamic_shapes,
                                  strict=True).run_decompositions(table).module()
    g = lowered.graph
    for node in list(g.nodes):  # the fusion patterns expect permute, not t
        if node.target == torch.ops.aten.t.default:
            with g.inserting_before(node):
                node.replace_all_uses_with(g.call_function(torch.ops.aten.permute.default, args=(node.args[0], [1, 0])))
            g.erase_node(node)
    lowered.recompile()
    freezing_passes(lowered, (example,))
    constant_fold(lowered)
    return lowered


# --------------------------------------------------------------------------- measurements


def size_mb(state: Dict[str, torch.Tensor]) -> float:
    """Bytes of ``torch.save(state)``, in MiB."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes / 2**20


@torch.no_grad()
def latency_ms(model: nn.Module, image_size: int, batch: int, repeats: int) -> float:
    """Median CPU time of one forward pass of a ``batch`` of images, in ms (two warm-up runs)."""
    g = torch.Generator().manual_seed(0)  # the trial's RNG is not drawn from
    x = torch.randn(batch, 3, image_size, image_size, generator=g)
    for _ in range(2):
        model(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


@torch.no_grad()
def accuracy(model: nn.Module, batches: Iterable[Tuple[torch.Tensor, torch.Tensor]],
             autocast: Optional[Callable] = None) -> float:
    """Top-1 accuracy of ``model`` on ``(inputs, labels)`` batches already on its device."""
    right = seen = 0
    for x, y in batches:
        if autocast is not None:
            with autocast():
                logits = model(x)
        else:
            logits = model(x)
        right += int((logits.argmax(1) == y).sum())
        seen += len(y)
    return right / max(seen, 1)

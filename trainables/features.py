"""The frozen-prefix feature cache: what the frozen layer groups compute, computed once.

When a trial's first k layer groups stay frozen (and in eval mode) for a whole phase, their
output for an image never changes: a linear probe, or ``unfreeze_last: 1``, spends almost all
its time in layers that learn nothing. The model is split at the boundary of group k
(``split_at``: torch.fx, tracing through the model as timm does); the prefix runs once per
image (per augmentation view when augmentation comes before it), its outputs go to the node's
disk (keyed by the backbone, its weights, k, the data and the view), and the trainable suffix
trains on them. Trials of a sweep that freeze the same prefix of the same backbone on the same
data share the cache. The logits are those of the full model (tests/test_speed.py compares).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import fx, nn


@dataclass
class Split:
    prefix: fx.GraphModule  # image batch -> tuple of boundary tensors
    suffix: fx.GraphModule  # boundary tensors -> logits
    k: int  # the groups in the prefix


def _tracer():
    try:
        from timm.models._features_fx import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm without its fx helpers: plain tracing
        return fx.Tracer()
    leaves = tuple(get_notrace_modules())

    class TimmAwareTracer(fx.Tracer):
        def __init__(self):
            super().__init__(autowrap_functions=tuple(get_notrace_functions()))

        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, leaves) or super().is_leaf_module(m, qualname)

    return TimmAwareTracer()


def split_at(model: nn.Module, groups: Sequence[Any], k: int) -> Optional[Split]:
    """The model as prefix (groups < k and what only they feed) and suffix, sharing the model's
    own parameters; None when the model cannot be traced."""
    try:
        tracer = _tracer()
        graph = tracer.trace(model)
    except Exception:  # data-dependent control flow and the like: no cache for this model
        return None
    owner: Dict[str, int] = {}
    for gi, g in enumerate(groups):
        for p in g.params:
            owner[p] = gi
            owner[p.rpartition(".")[0]] = gi
            if ".parametrizations." in p:  # m.parametrizations.weight.original (LoRA): module m is the group's too
                owner[p.partition(".parametrizations.")[0]] = gi

    def group_of(node: fx.Node) -> Optional[int]:
        if node.op in ("call_module", "get_attr"):
            target = node.target
            while target:
                if target in owner:
                    return owner[target]
                target = target.rpartition(".")[0]
        return None

    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # Nodes that do not depend on the image (parameters reshaped, constants) are computed in
    # whichever half uses them: a trainable parameter must never be frozen into the cache.
    data: Dict[fx.Node, bool] = {}
    for node in graph.nodes:
        data[node] = node is placeholders[0] or any(data.get(a, False) for a in node.all_input_nodes)
    part: Dict[fx.Node, int] = {}
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "output") or not data[node]:
            continue
        g = group_of(node)
        ins = [part.get(a, 0) for a in node.all_input_nodes if data.get(a)]
        part[node] = 1 if (g is not None and g >= k) or any(ins) else 0
    if not any(v == 1 for v in part.values()) or not any(v == 0 for v in part.values()):
        return None
    boundary = [n for n in graph.nodes if part.get(n) == 0 and any(part.get(u) == 1 or u.op == "output" for u in n.users)]
    shared = lambda n: n.op == "get_attr" or (n.op != "output" and n.op != "placeholder" and not data[n])  # noqa: E731
    prefix_graph, suffix_graph = fx.Graph(), fx.Graph()
    env0: Dict[fx.Node, fx.Node] = {}
    env1: Dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        if node.op == "placeholder" or shared(node) or part.get(node) == 0:
            env0[node] = prefix_graph.node_copy(node, lambda n: env0[n])
    prefix_graph.output(tuple(env0[n] for n in boundary))
    for i, n in enumerate(boundary):
        env1[n] = suffix_graph.placeholder(f"boundary_{i}")
    for node in placeholders[1:]:  # the forward's other arguments (attn_mask=None ...), with their defaults
        env1[node] = suffix_graph.node_copy(node, lambda n: env1[n])
    for node in graph.nodes:
        if shared(node) or part.get(node) == 1 or node.op == "output":
            env1[node] = suffix_graph.node_copy(node, lambda n: env1[n])
    prefix, suffix = fx.GraphModule(model, prefix_graph), fx.GraphModule(model, suffix_graph)
    for gm in (prefix, suffix):  # get_attr nodes a side does not use
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return Split(prefix, suffix, k)


# --------------------------------------------------------------------------- the cache


def cache_root() -> Path:
    return Path(os.environ.get("TL_SWEEP_CACHE", "~/.cache/tl-sweep")).expanduser() / "features"


def key_of(parts: Dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class FeatureSet(torch.utils.data.Dataset):
    """Cached prefix outputs of a data set (one or several views), memory-mapped; items are
    (tuple of boundary tensors, target) for the view chosen with ``use_view``."""

    def __init__(self, folder: Path, targets: np.ndarray):
        meta = json.loads((folder / "meta.json").read_text())
        self.folder, self.targets = folder, np.asarray(targets)
        self.shapes = [tuple(s) for s in meta["shapes"]]
        self.dtypes = meta["dtypes"]
        self.views = meta["views"]
        self.view = 0
        self._arrays: Optional[List[np.memmap]] = None

    def use_view(self, view: int) -> None:
        self.view = view % self.views

    @property
    def arrays(self) -> List[np.memmap]:
        if self._arrays is None:
            self._arrays = [np.memmap(self.folder / f"out{i}.bin", dtype=_stored(d), mode="r",
                                      shape=(self.views, len(self.targets), *s))
                            for i, (s, d) in enumerate(zip(self.shapes, self.dtypes))]
        return self._arrays

    def __getstate__(self):
        return {k: (None if k == "_arrays" else v) for k, v in self.__dict__.items()}

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        out = []
        for a, d in zip(self.arrays, self.dtypes):
            t = torch.from_numpy(np.array(a[self.view, i]))
            out.append(t.view(torch.bfloat16) if d == "bfloat16" else t)
        target = self.targets[i]  # a class, or a target vector of several tasks (trainables/tasks.py)
        return tuple(out), (int(target) if np.ndim(target) == 0 else torch.from_numpy(np.array(target)))


def cached_features(key: str, images: torch.utils.data.Dataset, targets: np.ndarray, views: int,
                    compute) -> FeatureSet:
    """The prefix outputs of ``images`` for each view, from the node's cache (computed with
    ``compute(view) -> iterator of tuples of batch tensors`` on first use, under a lock)."""
    root = cache_root()
    folder = root / key
    root.mkdir(parents=True, exist_ok=True)
    if not (folder / "complete").exists():
        with open(root / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (folder / "complete").exists():
                _fill(folder, len(targets), views, compute)
    return FeatureSet(folder, targets)


def _fill(folder: Path, n: int, views: int, compute) -> None:
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    arrays: Optional[List[np.memmap]] = None
    shapes: List[Tuple[int, ...]] = []
    dtypes: List[str] = []
    for view in range(views):
        start = 0
        for outs in compute(view):
            outs = [o.detach().cpu() for o in outs]
            if arrays is None:
                shapes = [tuple(o.shape[1:]) for o in outs]
                dtypes = [_np_dtype(o.dtype) for o in outs]
                arrays = [np.memmap(tmp / f"out{i}.bin", dtype=_stored(d), mode="w+", shape=(views, n, *s))
                          for i, (s, d) in enumerate(zip(shapes, dtypes))]
            for a, o in zip(arrays, outs):
                a[view, start : start + len(o)] = _to_np(o)
            start += len(outs[0])
        assert start == n, f"the prefix gave {start} outputs for {n} images"
    for a in arrays or []:
        a.flush()
    (tmp / "meta.json").write_text(json.dumps({"shapes": shapes, "dtypes": dtypes, "views": views}))
    (tmp / "complete").touch()
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def _np_dtype(dtype: torch.dtype) -> str:
    # numpy has no bfloat16: its bits are kept as 16-bit integers
    return "bfloat16" if dtype == torch.bfloat16 else str(torch.empty((), dtype=dtype).numpy().dtype)


def _stored(dtype: str) -> np.dtype:
    return np.dtype(np.int16) if dtype == "bfloat16" else np.dtype(dtype)


def _to_np(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()

"""What every strategy shares: per-group learning rates, freezing, eval mode for frozen parts,
and the hooks a strategy may use to change the model or the gradients.

Strategies import no torch at module level: their config models are read when a spec is
validated, and that must stay cheap.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from trainables.config import StrategyConfig
from trainables.registry import Registry
from trainables.strategies.batchnorm import apply_bn_grads, apply_bn_modes

if TYPE_CHECKING:
    from torch import nn

    from trainables.models import Backbone


class Strategy:
    """Decides, epoch by epoch, which layer groups train and at which learning rate.

    Group indices count along ``backbone.groups`` (stem = 0, head = last). The learning rate of a
    group at depth ``d`` below the head (head: d = 0) is ``group_lrs[d]`` when the config gives an
    explicit list, else ``lr * lr_decay ** d`` (layer-wise decay, as in ULMFiT / BEiT).

    Hooks, in the order a trial calls them: ``prepare`` (once per phase, before the optimizer
    exists: wrap or replace modules), ``apply`` and ``set_modes`` (every epoch), ``after_backward``
    and ``after_step`` (every step: gradient masks), ``state_dict`` / ``load_state_dict``
    (checkpoints), ``trainable_count`` (the weights that may move), ``export`` (a plain model).
    """

    registered_name = ""

    def __init__(self, backbone: "Backbone", cfg: StrategyConfig, lr: float):
        if not isinstance(cfg, StrategyConfig):  # a plain mapping: read it with this strategy's model
            cfg = STRATEGIES.section(self.registered_name)(dict(cfg))
        self.backbone, self.cfg, self.base_lr = backbone, cfg, lr
        self.num_groups = len(backbone.groups)

    # ------------------------------------------------------------------ policy
    def trainable_groups(self, epoch: int) -> List[int]:
        """Indices of the groups that train during ``epoch`` (1-based)."""
        raise NotImplementedError

    def group_lr(self, index: int) -> float:
        depth = self.num_groups - 1 - index
        explicit = self.cfg.group_lrs
        if explicit is not None:
            # Only the groups that train need a value: the length is checked when one is asked.
            if depth >= len(explicit):
                raise ValueError(
                    f"strategy.group_lrs has {len(explicit)} values (head first) but group "
                    f"{self.backbone.groups[index].name!r} is {depth} below the head"
                )
            return float(explicit[depth])
        return self.base_lr * self.cfg.lr_decay ** depth

    def frozen_prefix(self, epochs: int) -> int:
        """How many groups, from the stem, stay frozen (and in eval mode) in every epoch of a
        phase of ``epochs`` epochs: what the feature cache may compute once."""
        if self.cfg.bn not in ("train", "frozen"):
            return 0  # stats_only and bn_only change batch-norm in frozen groups
        return min(min(self.trainable_groups(e)) for e in range(1, epochs + 1))

    # ------------------------------------------------------------------ hooks
    def prepare(self, model: "nn.Module", batches: Optional[Callable[[int], Iterator[Tuple[Any, Any]]]] = None) -> None:
        """Once per phase, before the optimizer is built: wrap or replace modules (adapters,
        masks). Keep parameter names stable, or update ``self.backbone.groups``. ``batches(n)``
        yields up to ``n`` training batches ``(x, y)``, normalised and on the device, drawn with
        a generator of their own (the trial's shuffling is untouched): for masks that need
        gradients (Fisher). Runs again when a trial resumes; ``load_state_dict`` follows."""

    def trainable_count(self, model: "nn.Module") -> int:
        """How many weights this strategy lets move (``model/params_trainable``): by default every
        element of the parameters that require gradients; a strategy that masks some of them
        counts only the unmasked ones."""
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    def export(self, model: "nn.Module") -> "nn.Module":
        """The model as exported and served: plain modules, nothing this strategy added (LoRA
        merges its adapters into the weights). May return ``model`` itself."""
        return model

    def apply(self, model: "nn.Module", epoch: int) -> List[int]:
        """Set ``requires_grad`` for ``epoch`` and return the indices of the groups that have
        parameters in the optimizer (with ``bn: bn_only``, every group: its BN layers train)."""
        train = set(self.trainable_groups(epoch))
        if self.cfg.bn == "bn_only":
            train = set(range(self.num_groups))
        named = dict(model.named_parameters())
        for i, g in enumerate(self.backbone.groups):
            for p in g.params:
                named[p].requires_grad_(i in train)
        apply_bn_grads(model, self.cfg.bn, set(self.backbone.head.params))
        return sorted(train)

    def set_modes(self, model: "nn.Module") -> None:
        """Train / eval mode of every module for an epoch of training."""
        model.train()
        freeze_frozen_modules(model)
        apply_bn_modes(model, self.cfg.bn)

    def param_groups(self, model: "nn.Module", indices: Sequence[int]) -> List[Dict[str, Any]]:
        """One optimizer param group per layer group: its trainable parameters, its LR."""
        named = dict(model.named_parameters())
        out = []
        for i in indices:
            params = [named[p] for p in self.backbone.groups[i].params if named[p].requires_grad]
            if params:
                lr = self.group_lr(i)
                out.append({"params": params, "lr": lr, "base_lr": lr, "name": self.backbone.groups[i].name})
        return out

    def after_backward(self, model: "nn.Module") -> None:
        """After ``loss.backward()``, before the optimizer steps (e.g. mask gradients)."""

    def after_step(self, model: "nn.Module") -> None:
        """After ``optimizer.step()`` (e.g. restore weights the optimizer must not move)."""

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint must carry beyond the model and the optimizer (e.g. masks)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


def freeze_frozen_modules(model: "nn.Module") -> None:
    """Put every module whose parameters are all frozen in eval mode.

    A frozen group is a fixed feature extractor: its batch-norm keeps the pretrained running
    statistics and its dropout / stochastic depth is off. Call after ``model.train()``.
    """
    for _, m in model.named_modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


STRATEGIES: Registry[type] = Registry("strategy", config_base=StrategyConfig)

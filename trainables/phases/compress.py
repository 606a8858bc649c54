"""The ``compress`` phase: prune the fine-tuned model, let it recover, quantize it, and measure
it before and after (the mechanics: trainables/compress.py).

As the phase starts, a float copy of the model is kept (and measured before the first recovery
epoch) and the model is pruned (``prune``: ``unstructured``, the ``sparsity`` share of its conv
and linear weights outside the head set to zero; ``structured``, that share of the channels of
every coupled group removed). Its epochs fine-tune the pruned model as a ``train`` phase would
(its strategy, optimizer and LR; pruned weights stay zero after every step; never on cached
features, since the prefix changed). After the last, the test split, then an int8 copy
(``quantize``: ``dynamic``, the linear layers; ``static``, every conv and linear layer,
calibrated on ``calibration_batches`` training batches) and the measurements of the model as
it ships (the quantized copy, else the pruned model). Logged once, at the phase's last epoch:

- ``compress/acc_before``, ``compress/acc_after``: top-1 on the test split
- ``compress/size_mb_before``, ``compress/size_mb_after``: ``torch.save`` of the state dict
  (a dense file: unstructured zeros take room; int8 weights take a quarter)
- ``compress/latency_ms_b1_before`` / ``_after``, ``compress/latency_ms_b32_before`` / ``_after``:
  CPU, the trial's threads, median of ``latency_repeats`` runs
- ``compress/params_before`` / ``_after``, ``compress/macs_before`` / ``_after``: the float
  model's parameters and multiply-accumulates per image
- ``compress/sparsity``: the share of zeros among the prunable weights after recovery

Put it last: later phases train the pruned weights again (their masks are not kept). A resumed
trial prunes its rebuilt model as the phase starts (the same shapes: the ratio alone sets them),
then the checkpoint puts back the masks, the measurements before and the weights.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar, Dict, Literal, Optional

from pydantic import Field, field_validator

from trainables import metrics as M
from trainables.config import PhaseConfig
from trainables.phases.base import PHASES

if TYPE_CHECKING:
    from trainables.trainable import FineTuneTrial

PREFIX = "compress/"


class CompressConfig(PhaseConfig):
    kind: Literal["compress"] = "compress"
    epochs: Optional[int] = None  # recovery fine-tuning; default: the phase's train.epochs
    prune: Literal["none", "unstructured", "structured"] = "none"
    sparsity: float = Field(0.5, ge=0, lt=1)  # unstructured: share of weights zeroed; structured: of channels removed
    quantize: Literal["none", "dynamic", "static"] = "none"
    calibration_batches: int = Field(8, ge=1)  # training batches a static quantization observes
    latency_repeats: int = Field(20, ge=1)  # timed forward passes per batch size
    # a later phase's optimizer would not keep the pruning masks, nor its measurements hold
    last_only: ClassVar[bool] = True

    @field_validator("epochs")
    @classmethod
    def _recovers(cls, v: Optional[int]) -> Optional[int]:
        if v is not None and v < 1:
            raise ValueError("a compress phase needs 1 or more epochs: it measures the compressed model after its "
                             "last recovery epoch (a phase of 0 epochs never ends)")
        return v


@PHASES.register("compress", config=CompressConfig)
class CompressPhase:
    """Prune as the phase starts, recover for its epochs, quantize and measure at its end."""

    complete_checkpoints = True  # the pruned weights no longer match their pretrained source
    no_feature_cache = True  # a cached prefix output is the unpruned model's

    def __init__(self, trial: "FineTuneTrial", index: int):
        self.trial, self.index = trial, index
        self.cfg: CompressConfig = trial.phases[index]
        self.before: Dict[str, float] = {}
        self.masks: Dict[str, Any] = {}
        self.shapes: Dict[str, Any] = {}
        self.unpruned = None  # the float model as the phase found it, until it is measured
        self.hooked = None  # the optimizer whose steps re-apply the masks

    # ------------------------------------------------------------------ hooks
    def start(self) -> None:
        import copy

        from trainables import compress as C

        from torch.nn.utils import parametrize

        t = self.trial
        model = t.model
        if any(parametrize.is_parametrized(m) for m in model.modules()):
            raise ValueError(f"phases.{self.index}: a compress phase prunes and quantizes plain layers, but an earlier "
                             "phase's strategy left parametrizations (LoRA adapters) on the model; compress a model "
                             "fine-tuned without them, or start from its exported weights (model.weights)")
        self.unpruned = copy.deepcopy(self._plain(model)).cpu().eval()
        head = self._head_modules()
        if self.cfg.prune == "unstructured":
            self.masks = C.prune_unstructured(model, self.cfg.sparsity, exclude=head)
        elif self.cfg.prune == "structured":
            C.prune_structured(model, self.cfg.sparsity, self._example(t.device), ignored=head)
        self.shapes = C.shapes(model)

    def run_epoch(self) -> Dict[str, float]:
        """One recovery epoch (measuring the unpruned model first, once)."""
        t = self.trial
        if self.unpruned is not None:
            self.before = self._measure(self.unpruned, float_on_device=True)
            self.unpruned = None
        if self.masks and self.hooked is not t.optimizer:
            from trainables import compress as C

            params = dict(t.model.named_parameters())
            t.optimizer.register_step_post_hook(lambda *_: C.apply_masks(params, self.masks))
            self.hooked = t.optimizer
        metrics = t.train_one_epoch()
        metrics.update(t.evaluate(M.VAL))
        return metrics

    def finish(self) -> Dict[str, float]:
        """The test split, then the shipped model's measurements next to those before."""
        import copy

        from trainables import compress as C

        t = self.trial
        out = t.evaluate(M.TEST)
        plain = copy.deepcopy(self._plain(t.model)).cpu().eval()
        if self.cfg.quantize == "none":
            after = self._measure(plain, float_on_device=False, acc=out[M.TEST_ACC])
        else:
            n = self.cfg.calibration_batches
            quantized, stored = C.quantize(plain, self.cfg.quantize, lambda: (x for x, _ in t.calibration_batches(n)),
                                           self._example("cpu", batch=2))
            after = self._measure(quantized, float_on_device=False, stored=stored, float_model=plain)
        out.update({f"{PREFIX}{k}_before": v for k, v in self.before.items()})
        out.update({f"{PREFIX}{k}_after": v for k, v in after.items()})
        out[f"{PREFIX}sparsity"] = C.zero_share(t.model, self._head_modules())
        return out

    def state_dict(self) -> Dict[str, Any]:
        return {"before": dict(self.before), "masks": dict(self.masks), "shapes": dict(self.shapes)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """On resume, after ``start`` pruned the rebuilt model, before its weights load."""
        if not state:
            return
        if state["shapes"] != self.shapes:
            diff = [k for k in state["shapes"] if state["shapes"][k] != self.shapes.get(k)][:3]
            raise RuntimeError(f"phases.{self.index}: the checkpoint's pruned model has other shapes than this "
                               f"trial's ({', '.join(diff) or 'other tensors'}): it was pruned with another "
                               "config or another version of torch-pruning")
        self.before = dict(state["before"])
        self.unpruned = None  # measured before the interruption: the rebuilt model is not the one the phase found
        for name, mask in state["masks"].items():
            self.masks[name] = mask.to(self.trial.device).bool()

    # ------------------------------------------------------------------ helpers
    def _plain(self, model):
        """The model without what a strategy added (merged LoRA adapters); as served."""
        strategy = getattr(self.trial, "strategy", None)  # none yet when the trial's first phase starts
        return strategy.export(model) if strategy is not None else model

    def _head_modules(self):
        return sorted({p.rpartition(".")[0] for p in self.trial.backbone.head.params})

    def _example(self, device, batch: int = 1):
        """Normal noise at the phase's input size (for tracing and counting; not the trial's RNG)."""
        import torch

        size = self.trial.phase_cfg.data.image_size
        return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)

    def _test_batches(self, device):
        from trainables.data.loaders import eval_loader

        t = self.trial
        s = t.phase_cfg.train
        loader = eval_loader(t.data.test, s.eval_batch_size or 2 * s.batch_size, t.num_workers, t.pin_memory)
        for x, y in loader:
            yield t.inputs(x).to(device), y.to(device)

    def _measure(self, model, float_on_device: bool, acc: Optional[float] = None, stored=None,
                 float_model=None) -> Dict[str, float]:
        """Test accuracy, size on disk, CPU latency at batch 1 and 32, parameters and MACs of the
        float model (``float_model``, else ``model``) of a CPU ``model``."""
        from trainables import compress as C

        t = self.trial
        if acc is None:
            if float_on_device:  # as the trial evaluates: on its device, with its autocast
                model.to(t.device)
                acc = C.accuracy(model, self._test_batches(t.device), t.autocast)
                model.cpu()
            else:
                acc = C.accuracy(model, self._test_batches("cpu"))
        size = t.phase_cfg.data.image_size
        reps = self.cfg.latency_repeats
        macs, params = C.macs_and_params(float_model if float_model is not None else model, self._example("cpu"))
        return {"acc": acc, "size_mb": C.size_mb(stored if stored is not None else model.state_dict()),
                "latency_ms_b1": C.latency_ms(model, size, 1, reps),
                "latency_ms_b32": C.latency_ms(model, size, 32, reps),
                "params": params, "macs": macs}

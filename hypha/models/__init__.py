"""Models for Hypha's training executor, by name: ``load_model("gpt:tiny")``.

A model spec is one of:

* ``"gpt"``, ``"gpt:tiny"``, ``"gpt:small"``: the byte-level :class:`GPT` in one of the sizes of
  :data:`GPT_SIZES` (``"gpt"`` is ``"gpt:default"``, the model of bench/convergence.py);
  keyword arguments override its :class:`GPTConfig` fields (``load_model("gpt", context=128)``).
* ``"package.module:factory"``: ``import package.module`` (from ``sys.path``; the training
  executor runs in the job's work directory, which is on it, so a ``model.py`` fetched there
  works), then ``factory(**kwargs)``; ``factory`` may be a dotted attribute path
  (``"mylib.models:Net.small"``). The built-in names win: a module named ``gpt`` cannot be used.

The contract of a model, as the training executor uses it: an :class:`torch.nn.Module` whose
parameters are float32/float16/bfloat16. Given ``x``, token ids ``[batch, time]`` (int64), and
``y``, the next tokens (same shape), the executor minimises ``model.loss(x, y)`` when the model
has a ``loss`` method (returning a scalar tensor), else the mean cross-entropy of
``model(x)`` (logits ``[batch, time, vocab]``) against ``y``. A ``param_groups(weight_decay)``
method, when there is one, gives the inner optimizer's parameter groups (else all parameters
decay). A ``cfg.context`` attribute, when there is one, is the longest input it takes.

Every problem with a spec raises :class:`ModelSpecError` saying what is wrong.
"""

from hypha.models._load import (
    GPT_SIZES,
    ModelSpecError,
    load_model,
    parameter_groups,
    training_parameters,
)
from hypha.models.gpt import GPT, Block, GPTConfig

__all__ = [
    "GPT",
    "GPT_SIZES",
    "Block",
    "GPTConfig",
    "ModelSpecError",
    "load_model",
    "parameter_groups",
    "training_parameters",
]

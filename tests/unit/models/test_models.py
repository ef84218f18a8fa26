"""hypha.models: the built-in GPT, model specs, and the parameter order DiLoCo and the parameter
server share."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import hypha.models
from hypha.models import (
    GPT,
    GPT_SIZES,
    GPTConfig,
    ModelSpecError,
    load_model,
    parameter_groups,
    training_parameters,
)


def test_exports() -> None:
    modules = {"gpt"}  # and the private _load
    assert sorted(hypha.models.__all__) == sorted(
        name for name in dir(hypha.models) if not name.startswith("_") and name not in modules)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("spec", "size", "params"), [
    ("gpt", "default", 867_072),  # bench/convergence.py's model
    ("gpt:default", "default", 867_072),
    ("gpt:tiny", "tiny", 26_016),
    ("gpt:small", "small", 10_942_464),
])
def test_builtin_specs(spec: str, size: str, params: int) -> None:
    model = load_model(spec)
    assert isinstance(model, GPT)
    assert model.cfg == GPT_SIZES[size]
    assert _count(model) == params


def test_the_default_sizes_are_the_documented_ones() -> None:
    assert GPT_SIZES["default"] == GPTConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512,
                                             context=64)
    assert GPT_SIZES["tiny"] == GPTConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, context=32)
    assert GPTConfig() == GPT_SIZES["default"]


def test_keyword_arguments_override_the_size() -> None:
    model = load_model("gpt:tiny", context=8, n_layers=2)
    assert isinstance(model, GPT)
    assert (model.cfg.context, model.cfg.n_layers, model.cfg.d_model) == (8, 2, 32)


def test_forward_and_loss_shapes() -> None:
    torch.manual_seed(0)
    model = load_model("gpt:tiny")
    x = torch.randint(0, 256, (3, 17))
    y = torch.randint(0, 256, (3, 17))
    logits = model(x)
    assert logits.shape == (3, 17, 256)
    loss = model.loss(x, y)
    assert loss.shape == ()
    # near ln(256) at initialisation (small logits)
    assert abs(float(loss.detach()) - torch.log(torch.tensor(256.0)).item()) < 0.1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_the_same_seed_gives_the_same_model() -> None:
    torch.manual_seed(5)
    a = load_model("gpt:tiny")
    torch.manual_seed(5)
    b = load_model("gpt:tiny")
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_forward_refuses_inputs_longer_than_the_context() -> None:
    model = load_model("gpt:tiny")
    with pytest.raises(ValueError, match=r"1 <= time <= 32 .*got shape \[2, 33\]"):
        model(torch.zeros(2, 33, dtype=torch.long))
    with pytest.raises(ValueError, match="shape"):
        model(torch.zeros(33, dtype=torch.long))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"d_model": 30, "n_heads": 4}, "multiple of n_heads"),
    ({"n_layers": 0}, "Invalid n_layers: 0"),
    ({"context": True}, "Invalid context"),
])
def test_bad_gpt_configs(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        GPTConfig(**{**GPTConfig().__dict__, **kwargs})  # type: ignore[arg-type]


def test_param_groups_decay_only_matrices() -> None:
    model = load_model("gpt:tiny")
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() < 2 for p in no_decay["params"])
    assert len(training_parameters(model)) == len(list(model.parameters()))
    # the order DiLoCo sees: the groups' order, matrices first
    assert training_parameters(model) == decay["params"] + no_decay["params"]


@pytest.mark.parametrize(("spec", "message"), [
    ("", "non-empty string"),
    ("   ", "non-empty string"),
    ("gpt:huge", "no GPT size 'huge'; choose from 'gpt:tiny', 'gpt:default', 'gpt:small'"),
    ("resnet", "neither a built-in model"),
    ("my module:make", "neither a built-in model"),
    ("mod:", "neither a built-in model"),
    ("hypha_no_such_module_xyz:make", "no module named 'hypha_no_such_module_xyz'"),
    ("hypha.models:no_such_factory", "hypha.models has no attribute 'no_such_factory'"),
    ("hypha.models:GPT_SIZES", "is a mappingproxy, not a callable"),
])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(")):
        load_model(spec)


def test_a_spec_that_is_not_a_string() -> None:
    with pytest.raises(ModelSpecError, match="non-empty string"):
        load_model(3)  # type: ignore[arg-type]


def test_bad_gpt_kwargs_name_the_spec() -> None:
    with pytest.raises(ModelSpecError, match=r"'gpt:tiny': unknown GPT setting\(s\) width"):
        load_model("gpt:tiny", width=3)
    with pytest.raises(ModelSpecError, match="multiple of n_heads"):
        load_model("gpt:tiny", d_model=33)


@pytest.fixture
def module_dir(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "hypha_test_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        class Bigram(nn.Module):
            def __init__(self, vocab=256):
                super().__init__()
                self.table = nn.Embedding(vocab, vocab)

            def forward(self, x):
                return self.table(x)

            @classmethod
            def small(cls):
                return cls(vocab=16)

        def make(vocab=256):
            return Bigram(vocab)

        def not_a_module():
            return 42

        def broken():
            raise RuntimeError("no GPU here")

        class WithBadLoss(nn.Module):
            loss = 3

            def __init__(self):
                super().__init__()
                self.w = nn.Linear(2, 2)

        def bad_loss():
            return WithBadLoss()

        def no_params():
            return nn.ReLU()
    """))
    (tmp_path / "hypha_test_broken.py").write_text("import hypha_missing_dependency_xyz\n")
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for name in ("hypha_test_models", "hypha_test_broken"):
            sys.modules.pop(name, None)


def test_module_factory_specs(module_dir: Path) -> None:
    model = load_model("hypha_test_models:make", vocab=8)
    assert type(model).__name__ == "Bigram" and model.table.num_embeddings == 8
    assert load_model("hypha_test_models:Bigram.small").table.num_embeddings == 16
    # no param_groups method: one group of every trainable parameter
    (group,) = parameter_groups(model, 0.1)
    assert group["weight_decay"] == 0.1 and group["params"] == [model.table.weight]


@pytest.mark.parametrize(("spec", "message"), [
    ("hypha_test_models:not_a_module", "not_a_module() returned a int, not a torch.nn.Module"),
    ("hypha_test_models:broken", "broken(**{}) failed: RuntimeError: no GPU here"),
    ("hypha_test_models:bad_loss", "the model's 'loss' is a int"),
    ("hypha_test_models:no_params", "has no parameters to train"),
    ("hypha_test_models:Bigram.large", "hypha_test_models:Bigram has no attribute 'large'"),
    ("hypha_test_broken:make", "importing 'hypha_test_broken' failed: No module named "
                               "'hypha_missing_dependency_xyz'"),
])
def test_module_factory_errors(module_dir: Path, spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError) as caught:
        load_model(spec)
    assert message in str(caught.value)
    assert spec in str(caught.value)


def test_factory_kwargs_errors_are_explained(module_dir: Path) -> None:
    with pytest.raises(ModelSpecError, match=r"make.*failed: TypeError"):
        load_model("hypha_test_models:make", colour="red")


def test_bad_param_groups_are_refused() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(2, 2)

        def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
            return [{"params": [self.a.weight, self.a.weight]}]

    class Missing(Twice):
        def param_groups(self, weight_decay: float) -> list[dict[str, object]]:
            return [{"params": [self.a.weight]}]

    class NotAList(Twice):
        def param_groups(self, weight_decay: float) -> object:  # type: ignore[override]
            return self.parameters()

    with pytest.raises(ValueError, match="lists a parameter twice"):
        parameter_groups(Twice(), 0.0)
    with pytest.raises(ValueError, match=r"leaves out trainable parameter\(s\) a.bias"):
        parameter_groups(Missing(), 0.0)
    with pytest.raises(ValueError, match="must return a non-empty list"):
        parameter_groups(NotAList(), 0.0)

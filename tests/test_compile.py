"""Regional compilation (`gunn_exp.models.compile`): what is compiled, compiled once per shape,
same numbers as eager."""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch._dynamo.utils import counters

from gunn_exp.models import create_model
from gunn_exp.models.compile import compile_regions


def _step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def test_reference_units_compile_once_per_shape_and_match_eager() -> None:
    torch.manual_seed(0)
    eager = create_model("gunn_mini", impl="reference")  # stages of 2, 3, 4 units: 3 shapes
    model = copy.deepcopy(eager)
    names = compile_regions(model, backend="aot_eager")
    assert len(names) == 2 + 3 + 4 and all(".units." in n for n in names)
    assert model.state_dict().keys() == eager.state_dict().keys()  # checkpoints keep their keys
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    torch.testing.assert_close(_step(model, x, y), _step(eager, x, y))
    assert counters["stats"]["unique_graphs"] == 3  # one graph per unit shape, reused
    for p, p_eager in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_eager.grad, rtol=1e-5, atol=1e-6)
    for b, b_eager in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, b_eager)


@pytest.mark.parametrize(
    ("impl", "backend"),
    [
        ("recompute", "aot_eager"),
        ("keep_convs", "aot_eager"),
        # What compile=true runs: inductor's generated code (about a minute on a CPU).
        pytest.param("recompute", "inductor", marks=pytest.mark.slow),
    ],
)
def test_whole_layer_segments_compile_once_per_shape_and_match_eager(
    impl: str, backend: str
) -> None:
    torch.manual_seed(0)
    eager = create_model("gunn_mini", impl=impl)
    model = copy.deepcopy(eager)
    names = compile_regions(model, backend=backend)
    assert names == [f"stages.{i}.gunn1.segments" for i in range(3)]
    assert model.state_dict().keys() == eager.state_dict().keys()
    x, y = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    # aot_eager runs eager's operators; inductor's generated code sums in another order.
    tol = {"rtol": 1e-5, "atol": 1e-6} if backend == "aot_eager" else {"rtol": 1e-4, "atol": 1e-5}
    for _ in range(2):  # the second step reuses the compiled code
        torch.testing.assert_close(_step(model, x, y), _step(eager, x, y), **tol)
    for p, p_eager in zip(model.parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, p_eager.grad, **tol)
    for b, b_eager in zip(model.buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, b_eager, **tol)
    model.eval()
    eager.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager(x), **tol)
    # Per stage shape: G_i's training forward, its backward, its eval forward; shared by all units.
    assert counters["stats"]["unique_graphs"] == 3 * 3
    assert not counters["graph_break"]


def test_recat_compiles_per_layer_and_plain_models_whole() -> None:
    model = create_model("gunn_mini", impl="recat")
    assert compile_regions(model, backend="aot_eager") == [
        "stages.0.gunn1",
        "stages.1.gunn1",
        "stages.2.gunn1",
    ]
    assert compile_regions(create_model("resnet18_cifar"), backend="aot_eager") == [""]

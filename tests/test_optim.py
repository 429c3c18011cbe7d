"""Weight decay and the batchless statistics: bl.param_groups, and the warning of an optimizer about
to decay them (once per optimizer, whatever copies, conversions and reloads the model went through)."""

import copy
import gc
import importlib
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn

import batchless as bl
from batchless import _state

DECAYING = {  # the real torch optimizers, each with weight decay on every parameter
    "AdamW": lambda params: torch.optim.AdamW(params, lr=1e-3),  # weight_decay=0.01 by default
    "SGD": lambda params: torch.optim.SGD(params, lr=0.1, weight_decay=1e-4),
    "Adam": lambda params: torch.optim.Adam(params, lr=1e-3, weight_decay=1e-4),
}
OPTIMIZERS = {"AdamW": torch.optim.AdamW, "SGD": torch.optim.SGD, "Adam": torch.optim.Adam}


def make_model() -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(16, 5), bl.BatchlessNorm1d(5))
    bl.init_from_data(model, [torch.randn(8, 3, 4, 4)])
    return model


def steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 3) -> list:
    """The warnings about weight decay that ``n`` training steps give."""
    dtype = next(model.parameters()).dtype
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            optimizer.zero_grad()
            model(torch.randn(2, 3, 4, 4, dtype=dtype)).square().mean().backward()
            optimizer.step()
    return [w for w in caught if "weight_decay" in str(w.message)]


@pytest.mark.parametrize("name", DECAYING)
def test_an_optimizer_decaying_the_statistics_warns_once_with_the_fix(name):
    model = make_model()
    (caught,) = steps(model, DECAYING[name](model.parameters()))
    message = str(caught.message)
    assert caught.filename == __file__  # the user's optimizer.step() line
    assert message.startswith(f"{name} is about to step with weight_decay=")
    assert "on 4 batchless statistics parameters" in message and "mean towards 0" in message
    assert f"{name}(batchless.param_groups(model, weight_decay=" in message
    assert steps(model, DECAYING[name](model.parameters())) != []  # once per optimizer, not process


@pytest.mark.parametrize("name", DECAYING)
def test_no_warning_for_param_groups(name):
    model = make_model()
    optimizer = OPTIMIZERS[name](bl.param_groups(model, weight_decay=0.1), lr=1e-3)
    assert steps(model, optimizer) == []
    # the statistics' first step is the one they take without any weight decay
    twin = copy.deepcopy(model)
    for m, groups in ((model, bl.param_groups(model, weight_decay=0.5)), (twin, twin.parameters())):
        torch.manual_seed(0)
        steps(m, OPTIMIZERS[name](groups, lr=1e-2, weight_decay=0.0), n=1)
    pairs = zip(bl.statistics_parameters(model), bl.statistics_parameters(twin), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert not torch.equal(model[0].weight, twin[0].weight)  # the weights were decayed


@pytest.mark.parametrize("optimizer", [
    lambda params: torch.optim.AdamW(params, weight_decay=0.0),
    lambda params: torch.optim.SGD(params, lr=0.1),
    lambda params: torch.optim.Adam(params),
    lambda params: torch.optim.Rprop(params),  # no weight_decay option at all
], ids=["AdamW-wd0", "SGD", "Adam", "Rprop"])
def test_no_warning_without_weight_decay(optimizer):
    model = make_model()
    assert steps(model, optimizer(model.parameters())) == []


def test_no_warning_for_statistics_in_a_group_without_weight_decay():
    model = make_model()
    stats = set(bl.statistics_parameters(model))
    groups = [{"params": [p for p in model.parameters() if p not in stats]},
              {"params": list(stats), "weight_decay": 0}]
    assert steps(model, torch.optim.AdamW(groups, weight_decay=0.1)) == []


def test_no_warning_for_models_without_batchless_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5))
    assert steps(model, torch.optim.AdamW(model.parameters())) == []
    statistics = make_model()  # batchless layers elsewhere in the process do not matter
    assert steps(model, torch.optim.AdamW(model.parameters())) == []
    assert len(steps(statistics, torch.optim.AdamW(statistics.parameters()))) == 1


@pytest.mark.parametrize("copy_model", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: m.to(torch.float64),
    lambda m: torch.nn.Sequential(*m),  # the same layers in another model
], ids=["deepcopy", "pickle", "to", "reused"])
def test_the_statistics_are_recognised_in_copies(copy_model):
    model = copy_model(make_model())
    assert len(steps(model, torch.optim.AdamW(model.parameters()))) == 1
    assert steps(model, torch.optim.AdamW(bl.param_groups(model, weight_decay=0.01))) == []


def test_the_statistics_are_recognised_when_new_parameters_replace_them():
    model = make_model()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = model.to(torch.float64)  # new nn.Parameter objects
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # and again
    assert len(steps(model, torch.optim.AdamW(model.parameters()))) == 1


def test_a_converted_batchnorm_model():
    model = bl.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                               nn.Linear(16, 5), nn.BatchNorm1d(5)))
    assert len(steps(model, torch.optim.AdamW(model.parameters()))) == 1
    assert steps(model, torch.optim.AdamW(bl.param_groups(model, weight_decay=0.01))) == []


def test_reloading_registers_the_hook_once():
    importlib.reload(bl.optim)
    importlib.reload(bl)
    model = make_model()
    assert len(steps(model, torch.optim.AdamW(model.parameters()))) == 1


def test_the_registries_keep_nothing_alive():
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters())
    steps(model, optimizer, 1)
    assert model[1] in _state.STATE.layers and optimizer in _state.STATE.checked_optimizers
    alive = [weakref.ref(model[1]), weakref.ref(optimizer)]
    del model, optimizer
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_param_groups_hold_every_trainable_parameter_once():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(make_model(), shared, shared, bl.BatchlessNorm1d(5, affine=False))
    model[0][0].bias.requires_grad_(False)  # frozen: in no group
    groups = bl.param_groups(model, weight_decay=0.05, lr=1e-2, betas=(0.8, 0.9))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    decay, no_decay = groups
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in bl.statistics_parameters(model)]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(g["lr"] == 1e-2 and g["betas"] == (0.8, 0.9) for g in groups)
    torch.optim.AdamW(groups)  # a torch optimizer takes them


def test_param_groups_leave_out_empty_groups():
    plain = nn.Linear(3, 3)
    assert [g["weight_decay"] for g in bl.param_groups(plain, 0.1)] == [0.1]
    layer = bl.BatchlessNorm1d(3, affine=False)
    assert [g["weight_decay"] for g in bl.param_groups(layer, 0.1)] == [0.0]
    assert bl.param_groups(nn.ReLU(), 0.1) == []


@pytest.mark.parametrize("call, message", [
    (lambda m: bl.param_groups([m], 0.1), "param_groups expects a torch.nn.Module, got list"),
    (lambda m: bl.param_groups(m, -0.1), "weight_decay to be a finite number >= 0, got -0.1"),
    (lambda m: bl.param_groups(m, float("nan")), "finite number >= 0, got nan"),
    (lambda m: bl.param_groups(m, "0.1"), "finite number >= 0, got '0.1'"),
    (lambda m: bl.param_groups(m, True), "finite number >= 0, got True"),
    (lambda m: bl.param_groups(m, 0.1, params=[]), "drop it, or build the groups yourself"),
])
def test_param_groups_check_their_arguments(call, message):
    with pytest.raises(bl.BatchlessError, match=message.replace("(", r"\(")):
        call(make_model())

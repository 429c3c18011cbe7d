"""Weight decay and the batchless layers: torch's optimizers step their statistics, and their weight
and bias unless decay_affine=True, as without weight decay (the library cancels it), any other
optimizer warns once with the fix (bl.param_groups), whatever copies, conversions and reloads the
model went through."""

import copy
import gc
import importlib
import pickle
import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

import batchless as bl
from batchless import _state

optim = torch.optim
# torch's optimizers, each with weight decay on every parameter (coupled unless said otherwise)
TORCH = {
    "AdamW": lambda params: optim.AdamW(params, lr=1e-2),  # decoupled, weight_decay=0.01 by default
    "AdamW-foreach": lambda params: optim.AdamW(params, lr=1e-2, weight_decay=0.5, foreach=True),
    "AdamW-fused": lambda params: optim.AdamW(params, lr=1e-2, weight_decay=0.5, fused=True),
    "Adam": lambda params: optim.Adam(params, lr=1e-2, weight_decay=0.5),
    "Adam-decoupled": lambda params: optim.Adam(params, lr=1e-2, weight_decay=0.5,
                                            decoupled_weight_decay=True),
    "Adam-maximize": lambda params: optim.Adam(params, lr=1e-2, weight_decay=0.5, maximize=True),
    "SGD": lambda params: optim.SGD(params, lr=0.1, weight_decay=0.5),
    "SGD-nesterov-fused": lambda params: optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True,
                                               weight_decay=0.5, fused=True),
    "SGD-maximize-foreach": lambda params: optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.5,
                                                 maximize=True, foreach=True),
    "NAdam": lambda params: optim.NAdam(params, lr=1e-2, weight_decay=0.5),
    "NAdam-decoupled": lambda params: optim.NAdam(params, lr=1e-2, weight_decay=0.5,
                                              decoupled_weight_decay=True),
    "RAdam-decoupled": lambda params: optim.RAdam(params, lr=1e-2, weight_decay=0.5,
                                              decoupled_weight_decay=True),
    "Adamax": lambda params: optim.Adamax(params, lr=1e-2, weight_decay=0.5),
    "RMSprop": lambda params: optim.RMSprop(params, lr=1e-2, weight_decay=0.5, momentum=0.5),
    "Adagrad": lambda params: optim.Adagrad(params, lr=1e-2, weight_decay=0.5),
    "Adadelta": lambda params: optim.Adadelta(params, lr=1.0, weight_decay=0.5),
    "ASGD": lambda params: optim.ASGD(params, lr=1e-2, weight_decay=0.5),
}


class MyAdamW(torch.optim.AdamW):
    """A subclass: its update may differ from AdamW's, so the library only warns."""


def make_model(decay_affine: bool = False) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), bl.BatchlessNorm2d(4, decay_affine=decay_affine),
                          nn.ReLU(), nn.Flatten(), nn.Linear(16, 5),
                          bl.BatchlessNorm1d(5, decay_affine=decay_affine))
    bl.init_from_data(model, [torch.randn(8, 3, 4, 4)])
    return model


def exempt(model: nn.Module) -> list:
    """The parameters weight decay must not move: the batchless statistics, and the batchless
    layers' weight and bias where decay_affine is False."""
    ids = {id(p) for m in model.modules() if isinstance(m, (bl.BatchlessNorm1d, bl.BatchlessNorm2d))
           for p in ([m.raw_mean, m.raw_std] + ([] if m.decay_affine else [m.weight, m.bias]))
           if p is not None}
    return [p for p in model.parameters() if id(p) in ids]


def steps(model: nn.Module, optimizer: torch.optim.Optimizer, n: int = 3, seed: int = 0) -> list:
    """The warnings about weight decay that ``n`` training steps give."""
    dtype = next(model.parameters()).dtype
    torch.manual_seed(seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(n):
            optimizer.zero_grad()
            model(torch.randn(2, 3, 4, 4, dtype=dtype)).square().mean().backward()
            optimizer.step()
    return [w for w in caught if "weight_decay" in str(w.message)]


def without_decay(model: nn.Module, make_optimizer, n: int = 3) -> nn.Module:
    """A copy of ``model`` after ``n`` steps of the optimizer with the exempt parameters in a group
    of their own without weight decay (``bl.param_groups``'s)."""
    twin = copy.deepcopy(model)
    decay = make_optimizer(twin.parameters()).param_groups[0]["weight_decay"]  # (never stepped)
    assert decay > 0
    assert steps(twin, make_optimizer(bl.param_groups(twin, weight_decay=decay)), n) == []
    return twin


def differences(model: nn.Module, twin: nn.Module) -> tuple[float, float]:
    """The largest relative differences of the exempt parameters and of the other parameters."""
    def largest(pairs) -> float:
        return max(float(((a - b).abs() / b.abs().clamp_min(1e-3)).max()) for a, b in pairs)

    ids = {id(p) for p in exempt(model)}
    with torch.no_grad():
        pairs = list(zip(model.parameters(), twin.parameters(), strict=True))
        return (largest((p, q) for p, q in pairs if id(p) in ids),
                largest((p, q) for p, q in pairs if id(p) not in ids))


@pytest.mark.parametrize("name", TORCH)
@pytest.mark.parametrize("decay_affine", [False, True])
def test_torch_optimizers_step_the_exempt_parameters_without_weight_decay(name, decay_affine):
    model = make_model(decay_affine)
    assert len(exempt(model)) == (4 if decay_affine else 8)
    twin = without_decay(model, TORCH[name])
    assert steps(model, TORCH[name](model.parameters())) == []  # no warning: nothing to fix
    exempted, rest = differences(model, twin)
    assert exempted < 1e-5 and rest < 1e-5  # the others were decayed alike
    # without the library, the exempt parameters would have been decayed: a visible difference
    plain = copy.deepcopy(model)
    optimizer = TORCH[name](plain.parameters())
    with _hook_removed():
        steps(plain, optimizer)
    assert not differences(plain, twin)[0] <= 1e-3  # (or NaN: SGD diverges)


class _hook_removed:
    def __enter__(self):
        bl.optim._HOOK.remove()

    def __exit__(self, *_):
        bl.optim._HOOK = register_optimizer_step_pre_hook(bl.optim._exempt_from_decay)


def test_the_cancelled_decay_follows_the_learning_rate_schedule():
    make = TORCH["AdamW-foreach"]
    model, twin = make_model(), make_model()
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = make(model.parameters()), make(bl.param_groups(twin, weight_decay=0.5))
    for o in (opt, twin_opt):
        o.param_groups[-1]["lr"] = 1e-2
    schedules = [optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.3) for o in (opt, twin_opt)]
    for m, o, schedule in zip((model, twin), (opt, twin_opt), schedules, strict=True):
        for step in range(4):
            steps(m, o, n=1, seed=step)
            schedule.step()
    assert differences(model, twin)[0] < 1e-5


def test_statistics_without_a_gradient_are_left_alone():
    model = make_model()
    before = [p.clone() for p in bl.statistics_parameters(model)]
    optimizer = optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    model[0].weight.sum().backward()  # only the conv gets a gradient
    optimizer.step()
    stats = bl.statistics_parameters(model)
    assert all(torch.equal(a, b) for a, b in zip(before, stats, strict=True))


@pytest.mark.parametrize("name", ["AdamW-fused", "SGD-nesterov-fused", "Adam-fused"])
def test_a_grad_scaler_stepping_a_fused_optimizer(name):
    """The scaler leaves the gradients scaled and hands the optimizer the scale and found_inf."""
    make = TORCH.get(name) or (lambda params: optim.Adam(params, lr=1e-2, weight_decay=0.5,
                                                        fused=True))
    model = make_model()
    twin = without_decay(model, make)
    optimizer, scaler = make(model.parameters()), torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(0)
    for _ in range(3):
        optimizer.zero_grad()
        with bl.nll_weight(scaler):
            loss = model(torch.randn(2, 3, 4, 4)).square().mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    assert getattr(optimizer, "_step_supports_amp_scaling", False)
    assert differences(model, twin)[0] < 1e-5
    # a step the scaler skips (an inf gradient) moves nothing, the statistics included
    before = [p.clone() for p in model.parameters()]
    optimizer.zero_grad()
    with bl.nll_weight(scaler):
        loss = model(torch.randn(2, 3, 4, 4)).square().mean()
    scaler.scale(loss).backward()
    model[0].weight.grad[0, 0, 0, 0] = float("inf")
    scaler.step(optimizer)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("keyword", [False, True])
def test_a_step_with_a_closure(name, keyword):
    """The closure computes the gradients inside the step (as Lightning's loop does): the decay is
    cancelled after it, before the update."""
    model = make_model()
    twin = without_decay(model, TORCH[name])
    optimizer = TORCH[name](model.parameters())
    torch.manual_seed(0)

    def closure():
        optimizer.zero_grad()
        loss = model(torch.randn(2, 3, 4, 4)).square().mean()
        loss.backward()
        return loss

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            loss = optimizer.step(closure=closure) if keyword else optimizer.step(closure)
    assert loss.dim() == 0 and differences(model, twin)[0] < 1e-5


def test_other_optimizers_warn_once_with_the_fix():
    model = make_model()
    (caught,) = steps(model, MyAdamW(model.parameters()))
    message = str(caught.message)
    assert caught.filename == __file__  # the user's optimizer.step() line
    assert message.startswith("MyAdamW is about to step with weight_decay=0.01")
    assert "on 8 batchless parameters" in message and "mean towards 0" in message
    assert "MyAdamW(batchless.param_groups(model, weight_decay=0.01)" in message
    assert steps(model, MyAdamW(model.parameters())) != []  # once per optimizer, not process
    # and the decay is not cancelled: the subclass's step may differ from AdamW's
    model = make_model()
    twin = without_decay(model, lambda params: MyAdamW(params, lr=1e-2, weight_decay=0.5))
    steps(model, MyAdamW(model.parameters(), lr=1e-2, weight_decay=0.5))
    assert differences(model, twin)[0] > 1e-3
    # with decay_affine=True only the statistics are counted
    model = make_model(decay_affine=True)
    (caught,) = steps(model, MyAdamW(model.parameters()))
    assert "on 4 batchless parameters" in str(caught.message)


def test_no_warning_for_param_groups():
    model = make_model()
    assert steps(model, MyAdamW(bl.param_groups(model, weight_decay=0.1), lr=1e-3)) == []


@pytest.mark.parametrize("optimizer", [
    lambda params: MyAdamW(params, weight_decay=0.0),
    lambda params: torch.optim.Rprop(params),  # no weight_decay option at all
], ids=["wd0", "Rprop"])
def test_no_warning_without_weight_decay(optimizer):
    model = make_model()
    assert steps(model, optimizer(model.parameters())) == []


def test_no_warning_for_exempt_parameters_in_a_group_without_weight_decay():
    model = make_model()
    stats = set(exempt(model))
    groups = [{"params": [p for p in model.parameters() if p not in stats]},
              {"params": list(stats), "weight_decay": 0}]
    assert steps(model, MyAdamW(groups, weight_decay=0.1)) == []


def test_exempt_parameters_added_in_a_later_group_are_found():
    model = make_model()
    stats = set(exempt(model))
    optimizer = MyAdamW([p for p in model.parameters() if p not in stats])
    assert steps(model, optimizer) == []
    optimizer.add_param_group({"params": list(stats)})
    assert len(steps(model, optimizer)) == 1


def test_no_warning_for_models_without_batchless_layers():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, 5))
    assert steps(model, MyAdamW(model.parameters())) == []
    statistics = make_model()  # batchless layers elsewhere in the process do not matter
    assert steps(model, MyAdamW(model.parameters())) == []
    assert len(steps(statistics, MyAdamW(statistics.parameters()))) == 1


@pytest.mark.parametrize("copy_model", [
    copy.deepcopy,
    lambda m: pickle.loads(pickle.dumps(m)),
    lambda m: m.to(torch.float64),
    lambda m: torch.nn.Sequential(*m),  # the same layers in another model
], ids=["deepcopy", "pickle", "to", "reused"])
def test_the_statistics_are_recognised_in_copies(copy_model):
    model = copy_model(make_model())
    assert len(steps(model, MyAdamW(model.parameters()))) == 1
    twin = without_decay(model, TORCH["AdamW-foreach"])
    steps(model, TORCH["AdamW-foreach"](model.parameters()))
    assert differences(model, twin)[0] < 1e-5


def test_the_statistics_are_recognised_when_new_parameters_replace_them():
    model = make_model()
    torch.__future__.set_overwrite_module_params_on_conversion(True)
    try:
        model = model.to(torch.float64)  # new nn.Parameter objects
    finally:
        torch.__future__.set_overwrite_module_params_on_conversion(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # and again
    assert len(steps(model, MyAdamW(model.parameters()))) == 1


def test_a_converted_batchnorm_model():
    model = bl.convert_batchnorm(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(),
                                               nn.Linear(16, 5), nn.BatchNorm1d(5)))
    assert len(steps(model, MyAdamW(model.parameters()))) == 1
    assert steps(model, MyAdamW(bl.param_groups(model, weight_decay=0.01))) == []


def test_reloading_registers_the_hook_once():
    importlib.reload(bl.optim)
    importlib.reload(bl)
    model = make_model()
    assert len(steps(model, MyAdamW(model.parameters()))) == 1
    twin = without_decay(model, TORCH["SGD"])
    steps(model, TORCH["SGD"](model.parameters()))  # cancelled once, not twice
    assert differences(model, twin)[0] < 1e-5


def test_the_registries_keep_nothing_alive():
    model = make_model()
    optimizer = MyAdamW(model.parameters())
    steps(model, optimizer, 1)
    assert model[1] in _state.STATE.layers and optimizer in _state.STATE.optimizers
    assert optimizer in _state.STATE.warned_optimizers
    alive = [weakref.ref(model[1]), weakref.ref(optimizer)]
    del model, optimizer
    gc.collect()
    assert [ref() for ref in alive] == [None, None]


def test_param_groups_hold_every_trainable_parameter_once():
    shared = nn.Linear(5, 5)
    model = nn.Sequential(make_model(), shared, shared, bl.BatchlessNorm1d(5, affine=False),
                          bl.BatchlessNorm1d(5, decay_affine=True))
    model[0][0].bias.requires_grad_(False)  # frozen: in no group
    groups = bl.param_groups(model, weight_decay=0.05, lr=1e-2, betas=(0.8, 0.9))
    trainable = [p for p in model.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert len(grouped) == len(trainable) == len({id(p) for p in grouped})
    assert {id(p) for p in grouped} == {id(p) for p in trainable}
    decay, no_decay = groups
    assert [id(p) for p in no_decay["params"]] == [id(p) for p in exempt(model)]
    assert len(no_decay["params"]) == 2 * 4 + 2 + 2  # the last layer's weight and bias decay
    ids = ({id(p) for p in decay["params"]}, {id(p) for p in no_decay["params"]})
    assert id(model[4].weight) in ids[0] and id(model[4].raw_std) in ids[1]
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

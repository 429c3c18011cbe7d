"""Shared by the MNIST-1D probes (fit, noise, swap, bnback, popnorm): one fair-protocol cell (Adam, cosine, 20
epochs) trained with the probe's change, and its final model measured before train_cell restores its best epoch."""
from batchless_experiments import train as T
from batchless_experiments.train import Cell, TrainConfig, evaluate, train_cell


def measure_before_restore(model, splits, final: dict) -> None:
    """Wraps ``model.load_state_dict`` (train_cell's last step restores the best epoch) so that it first writes the
    model's eval-mode ``[loss, accuracy]`` on the training, validation and test sets into ``final``."""
    load = model.load_state_dict

    def measure_then_load(state, *args, **kwargs):
        for name, x, y in (("train", splits.x_train, splits.y_train), ("val", splits.x_val, splits.y_val),
                           ("test", splits.x_test, splits.y_test)):
            final[name] = [round(v, 4) for v in evaluate(model, x, y)]
        return load(state, *args, **kwargs)

    model.load_state_dict = measure_then_load


def run(splits, norm: str, bs: int, lr: float, seed: int, ws: bool = False, prepare=None, **config) -> dict:
    """Trains ``norm`` (``default``: the library's batchless layer, std and mean 10x slow) on MNIST-1D, with
    ``prepare(model)`` applied to the model as built and ``config`` (e.g. ``optimizer="adamw"``) given to its
    TrainConfig; returns the record's results: test accuracy, the curve at
    25/50/75/100 % of the run, and the final model's eval-mode loss and accuracy."""
    final, build = {}, T.build_model

    def build_and_prepare(*args, **kwargs):
        model = build(*args, **kwargs)
        if prepare is not None:
            prepare(model)
        measure_before_restore(model, splits, final)
        return model

    speeds = {"std_speed": 0.1, "mean_speed": 0.1} if norm == "default" else {}
    cfg = TrainConfig(dataset="mnist1d", epochs=20, lr=lr, schedule="cosine", weight_std=ws, **speeds,
                      **config)
    T.build_model = build_and_prepare
    try:
        r = train_cell(Cell(cfg, "batchless" if norm == "default" else norm, bs, seed), splits, progress=False)
    finally:
        T.build_model = build
    return {"test": r.test_acc, "curve": [h.test_acc for h in r.history if h.test_acc is not None],
            "final (loss, acc), eval mode": final}

"""Shared by fit.py and noise.py: a run's final model measured before train_cell restores its best epoch."""
from batchless_experiments.train import evaluate


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

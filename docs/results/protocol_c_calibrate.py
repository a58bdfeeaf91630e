"""Protocol C's calibration: how well the first model fits its training set under the authors' schedule.

    python docs/results/protocol_c_calibrate.py runs/pools/fmnist-train runs/pools/fmnist-test 1000 40 80 120
    python docs/results/protocol_c_calibrate.py runs/pools/fmnist-train runs/pools/fmnist-test 1000 60 --wide

Trains the first cycle of a seed-0 chain (INITIAL random labels, the authors' SGD with
`TrainSchedule.scaled(EPOCHS)`, gray28 augmentation, batch 64, one thread) once per epoch count and
prints, per count: the last epoch's running accuracy on the augmented batches (what `lplgrad
simulate` records as `train_accuracy`), the accuracy on the clean training images in eval mode (the
">= 99% on the training set" criterion), the test accuracy and the seconds taken. `--wide` trains
the small CNN at widths 32/64/128 instead of 16/32/64, to tell capacity from optimisation.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch

from pipeline.augment import make_augment
from pipeline.checkpoint import ModelSpec
from pipeline.models.registry import register_model
from pipeline.models.small_cnn import SmallCNN
from pipeline.pools import spec_for_model
from pipeline.simulation import initial_keys, load_array_pool
from pipeline.simulation.fit import evaluate, train_in_memory
from pipeline.training import TrainSchedule


def wide_cnn(num_classes: int, in_channels: int) -> SmallCNN:
    return SmallCNN(num_classes, in_channels, widths=(32, 64, 128))


def main(pool_uri: str, test_uri: str, initial: int, epoch_counts: list[int], wide: bool) -> None:
    torch.set_num_threads(1)
    model = "small_cnn"
    if wide:
        model = "small_cnn_wide"
        register_model(model, input_shape=(1, 28, 28))(wide_cnn)
    pool = load_array_pool(pool_uri, spec_for_model("small_cnn"))
    decode = spec_for_model("small_cnn", num_classes=len(pool.classes))
    test = load_array_pool(test_uri, decode)
    index = pool.index()
    rows = np.array([index[k] for k in initial_keys(sorted(pool.keys), initial, 0)])
    for epochs in epoch_counts:
        trained = train_in_memory(
            ModelSpec(model, len(pool.classes)),
            pool.images[rows],
            pool.labels[rows],
            TrainSchedule.scaled(epochs),
            batch_size=64,
            seed=0,
            augment=make_augment("gray28", decode.mean, decode.std),
        )
        figures = {
            "model": model,
            "initial": initial,
            "epochs": epochs,
            "train_running_augmented": round(trained.train_accuracy, 4),
            "train_clean": round(evaluate(trained.model, pool.images[rows], pool.labels[rows]), 4),
            "test": round(evaluate(trained.model, test.images, test.labels), 4),
            "seconds": round(trained.seconds, 1),
        }
        print(json.dumps(figures), flush=True)


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if a != "--wide"]
    if len(arguments) < 4:
        raise SystemExit(__doc__)
    main(arguments[0], arguments[1], int(arguments[2]), [int(e) for e in arguments[3:]], "--wide" in sys.argv)

"""The in-memory dataset record every loader returns."""

import dataclasses

import numpy as np

CLASSIFICATION = "classification"
LANGUAGE_MODEL = "language_model"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train and test arrays plus what a model needs to know to fit them.

    For language models `num_classes` is the vocabulary size and `input_shape`
    is `(seq_len,)`; `train_y` holds the next-token targets.
    """

    name: str
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    input_shape: tuple
    task: str

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_x)

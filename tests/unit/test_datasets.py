"""The digits as hvdtrain reads them (scikit-learn's file, the stored split) equal scikit-learn's own."""

import numpy as np
import torch

from hvdtrain.train import datasets


def test_digits_equal_scikit_learns_load_digits_and_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None, :, :]
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.2, random_state=0, stratify=d.target)
    ours = datasets.digits()
    for got, want in [(ours.train.tensors, (x_tr, y_tr)), (ours.test.tensors, (x_te, y_te))]:
        assert torch.equal(got[0], torch.from_numpy(want[0])) and got[0].dtype == torch.float32
        assert torch.equal(got[1], torch.from_numpy(want[1].astype(np.int64)))
    assert (ours.input_shape, ours.num_classes, len(ours.train), len(ours.test)) == ((1, 8, 8), 10, 1437, 360)

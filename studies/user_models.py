"""Example user code for kdtune specs: a teacher network and a student family of your own.

A spec names them as "studies.user_models:<function>" (run kdtune from the repository's root, which Python then
searches). kdtune calls a teacher factory as factory(input_shape, n_classes) and a student factory as
factory(width, input_shape, n_classes); `input_shape` is (C, H, W) for images, (D,) for feature vectors. A spec
that names a module runs its code: name only modules you trust.
"""

from torch import nn


def wide_cnn(input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A teacher: three 'same' convolutions with batch norm, then global average pooling."""
    channels = input_shape[0]
    layers, width = [], channels
    for out in (64, 128, 256):
        layers += [nn.Conv2d(width, out, kernel_size=3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        width = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, n_classes))


def bottleneck_mlp(width: int, input_shape: tuple[int, ...], n_classes: int) -> nn.Module:
    """A student family: a hidden layer of `width` units, then one of a quarter of that, for feature vectors."""
    n_inputs = input_shape[0] if len(input_shape) == 1 else input_shape[0] * input_shape[1] * input_shape[2]
    return nn.Sequential(nn.Flatten(), nn.Linear(n_inputs, width), nn.ReLU(), nn.Linear(width, max(1, width // 4)),
                         nn.ReLU(), nn.Linear(max(1, width // 4), n_classes))

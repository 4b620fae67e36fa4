"""The built-in networks: the teacher (the seed project's CNN) and the student families (an MLP, a small CNN).

Every model takes `data.model_inputs`: images (N, C, H, W), or feature vectors (N, D) for the MLP.
"""

import math

import torch
from torch import nn

from kdtune.spec import SpecError

# The seed's valid 3x3 convolutions and two 2x2 poolings take a side s to ((s - 2) // 2 - 2) // 2 pixels, at least
# 1 from s = 10 on. A shorter side is padded by 1 in both convolutions, which then keep it: 4 -> 2 -> 1.
SEED_MIN_SIDE = 10
TEACHER_MIN_SIDE = 4


class TeacherCNN(nn.Sequential):
    """conv3x3(64) -> ReLU -> maxpool2 -> conv3x3(128) -> ReLU -> maxpool2 -> dense 1024 -> ReLU -> dense C.

    The seed architecture: 3,378,970 parameters at 28x28 grey with 26 classes. Colour images widen the first
    convolution's input to 3 channels. Its valid convolutions need sides of at least 10, so a side below 10
    (8x8 digits, say) is padded by 1 in both convolutions instead, which lets images down to TEACHER_MIN_SIDE
    (4) on a side through. Sides of 10 or more are built exactly as the seed's.

    Two changes that compute the same function faster (1.3x images/s on 2 AVX2 cores, bench/run.py): each
    ReLU runs after its max-pooling (ReLU is monotone, so max and ReLU commute, on a quarter of the values),
    and the weights are channels-last, which oneDNN's convolutions and pooling prefer. Neither these nor the
    padding change the parameters' names or shapes, so cached teachers load as before.
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int):
        channels, *image_shape = _image_shape(input_shape, "the built-in teacher CNN")
        height, width = (self.features_side(side) for side in image_shape)
        padding = tuple(self.padding(side) for side in image_shape)
        super().__init__(
            nn.Conv2d(channels, 64, kernel_size=3, padding=padding), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(64, 128, kernel_size=3, padding=padding), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(128 * height * width, 1024), nn.ReLU(), nn.Linear(1024, n_classes))
        self.to(memory_format=torch.channels_last)

    @staticmethod
    def padding(side: int) -> int:
        return 0 if side >= SEED_MIN_SIDE else 1

    @classmethod
    def features_side(cls, side: int) -> int:
        """The side of the feature maps the first dense layer flattens."""
        if side < TEACHER_MIN_SIDE:
            raise SpecError(f"TeacherCNN needs images of at least {TEACHER_MIN_SIDE}x{TEACHER_MIN_SIDE} pixels, "
                            f"but got a side of {side}.")
        lost_per_conv = 2 - 2 * cls.padding(side)
        return ((side - lost_per_conv) // 2 - lost_per_conv) // 2


class StudentMLP(nn.Sequential):
    """flatten -> `depth` x (dense `width` -> ReLU) -> dense C (415,258 parameters at 28x28, width 512, depth 1,
    26 classes). Depth 1 keeps the layer names of the one-layer MLP, so its saved students load as before."""

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, width: int, depth: int = 1):
        sizes = [math.prod(input_shape)] + [width] * depth
        hidden = [layer for n_in, n_out in zip(sizes, sizes[1:]) for layer in (nn.Linear(n_in, n_out), nn.ReLU())]
        super().__init__(nn.Flatten(), *hidden, nn.Linear(width, n_classes))


class StudentCNN(nn.Sequential):
    """conv3x3(`width`) -> ReLU -> maxpool2 -> conv3x3(2 `width`) -> ReLU -> maxpool2 -> dense C: a small CNN
    whose channel count scales with `width` (50,186 parameters at 28x28 grey, width 32, 10 classes).

    'Same' padding keeps each side through the convolutions, so any image of 4x4 or more fits. As in the
    teacher, each ReLU runs after its pooling (the same function on a quarter of the values) and the weights are
    channels-last.
    """

    def __init__(self, input_shape: tuple[int, ...], n_classes: int, width: int):
        channels, height, width_pixels = _image_shape(input_shape, "the student family \"cnn\"")
        if min(height, width_pixels) < TEACHER_MIN_SIDE:
            raise SpecError(f"the student family \"cnn\" needs images of at least {TEACHER_MIN_SIDE}x"
                            f"{TEACHER_MIN_SIDE} pixels, but got {height}x{width_pixels}.")
        super().__init__(
            nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
            nn.Flatten(), nn.Linear(2 * width * (height // 4) * (width_pixels // 4), n_classes))
        self.to(memory_format=torch.channels_last)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _image_shape(input_shape: tuple[int, ...], what: str) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise SpecError(f"{what} takes images, but this data holds feature vectors of length {input_shape[0]}; give "
                        "[teacher] logits or a model of your own, and students of family \"mlp\".")
    return tuple(input_shape)

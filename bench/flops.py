"""FLOPs of a one-hidden-layer student's training epoch, for GFLOP/s figures set beside the matmul peak."""


def student_flops_per_epoch(n_images: int, n_pixels: int, width: int, n_classes: int) -> tuple[float, float]:
    """(model FLOPs by the usual 6·N·parameters rule, FLOPs the step really executes): the first layer's input
    needs no gradient, so its backward is one matmul, not two."""
    layer1, layer2 = n_pixels * width, width * n_classes
    return 6 * n_images * (layer1 + layer2), n_images * (4 * layer1 + 6 * layer2)

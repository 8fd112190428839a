"""The ApET authors' stage-1 procedure, re-stated one image at a time with their tensor operations.

This is the speed reference of ``tokencomp bench``: what running the authors' code
(``MaQianKun0/ApET``, ``llava/model/utils.py::fps`` and ``llava_arch.py::encode_images`` /
``token_merging``) costs, image by image, on the same tokens. It follows their operations one for one:
farthest-point sampling that forms ``(x - c) ** 2`` over all tokens at every step, the ridge solve,
``topk``, boolean-mask basis injection, and a merge whose cosine similarities come from
``F.cosine_similarity`` broadcast over a ``[N - K, K - M, D]`` tensor. Two things differ, both so the
output can be compared with :class:`tokencomp.strategies.apet.ApET` exactly: the start index of FPS is
passed in rather than drawn inside, and the arithmetic stays in float32 (the authors cast to half
precision between the ranking and the merge, which on a CPU is only slower).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def authors_fps(x: torch.Tensor, m: int, start: torch.Tensor) -> torch.Tensor:
    """The authors' ``fps(x, K)`` on ``x`` ``[B, N, D]`` from the start indices ``start`` ``[B]``."""
    b, n, _ = x.shape
    centroids = torch.zeros(b, m, dtype=torch.long)
    dist = torch.full((b, n), 1e10)
    farthest = start
    for i in range(m):
        centroids[:, i] = farthest
        centroid = x[torch.arange(b), farthest].unsqueeze(1)
        dist = torch.min(dist, ((x - centroid) ** 2).sum(-1))
        farthest = dist.max(1)[1]
    return centroids


def authors_apet_image(x: torch.Tensor, k: int, start: int, m: int = 10, ridge: float = 1e-5) -> torch.Tensor:
    """The authors' stage 1 on one image ``x`` ``[N, D]``: the ``K`` output tokens in position order.

    ``start`` is the first FPS index; ``m`` the number of basis tokens; ``ridge`` the Gram ridge.
    """
    image_features = x.unsqueeze(0).float()
    b, n, d = image_features.shape
    fps_indices = authors_fps(image_features, m, torch.tensor([start]))
    seed_features = image_features.gather(1, fps_indices.unsqueeze(-1).expand(-1, -1, d))

    gram = torch.matmul(seed_features, seed_features.transpose(-1, -2))
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    rhs = torch.matmul(seed_features, image_features.transpose(-1, -2))
    linear_group = torch.linalg.solve(gram, rhs).transpose(-1, -2)
    errors = torch.norm(image_features - torch.matmul(linear_group, seed_features), dim=-1)
    errors_indices = torch.topk(errors, k=k, dim=1)[1]

    # basis injection by boolean mask into the M kept slots of lowest error
    image_features = image_features.clone()
    index_mask = torch.zeros(b, n, dtype=torch.bool)
    index_mask.scatter_(1, errors_indices[:, -m:], True)
    image_features[0][index_mask[0]] = seed_features[0]

    # token_merging: every dropped token joins its most cosine-similar kept non-basis token
    index_mask = torch.zeros(b, n, dtype=torch.bool)
    index_mask.scatter_(1, errors_indices, True)
    merged = image_features[0][errors_indices[0][:-m]].unsqueeze(0)
    dropped = image_features[0][~index_mask[0]].unsqueeze(0)
    if dropped.shape[1]:
        cosine = F.cosine_similarity(dropped.unsqueeze(2), merged.unsqueeze(1), dim=3)  # [1, N-K, K-M]
        nearest = cosine.argmax(dim=2)
        count = torch.zeros(b, merged.shape[1], dtype=torch.int)
        merged.scatter_add_(1, nearest.unsqueeze(-1).expand(-1, -1, d), dropped)
        count.scatter_add_(1, nearest, torch.ones_like(nearest, dtype=count.dtype))
        merged /= 1 + count.unsqueeze(2)
        image_features[0, errors_indices[0][:-m]] = merged[0]
    return image_features[0][index_mask[0]]


def authors_apet(x: torch.Tensor, k: int, starts: torch.Tensor, m: int = 10, ridge: float = 1e-5) -> torch.Tensor:
    """:func:`authors_apet_image` on each image of ``x`` ``[B, N, D]`` in turn; ``[B, K, D]``."""
    return torch.stack([authors_apet_image(x[i], k, int(starts[i]), m, ridge) for i in range(x.shape[0])])

"""vit-pytorch's DeiT distillation (``vit_pytorch/distill.py``): ``DistillableViT`` and ``DistillWrapper``.

DeiT (Touvron et al., arXiv:2012.12877) appends a learned distillation token to the student's tokens;
its output, through ``distill_mlp``, learns the teacher's predictions (soft: KL divergence of the
temperature-softened distributions; hard: cross entropy on the teacher's argmax), alongside the usual
cross entropy on the class token. The student's attention runs on ``patch_attention`` (our ViT).
Same constructor arguments and state_dict keys as vit-pytorch's classes. vit-pytorch's
``DistillableT2TViT`` and ``DistillableEfficientViT`` are not provided.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .vit import ViT, check_image


class DistillableViT(ViT):
    """Our :class:`ViT` that also takes a distillation token (vit-pytorch's ``DistillableViT``).

    ``forward(img)`` is ViT's; ``forward(img, distill_token)`` (token ``[1, dim]``) appends it after
    the positional embedding and returns ``(logits, distill_token_output [B, dim])``.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.args, self.kwargs = args, kwargs
        self.dim = kwargs["dim"]
        self.num_classes = kwargs["num_classes"]

    def to_vit(self) -> ViT:
        """A plain :class:`ViT` with these weights."""
        vit = ViT(*self.args, **self.kwargs)
        vit.load_state_dict(self.state_dict())
        return vit

    def forward(self, img: Tensor, distill_token: Optional[Tensor] = None):
        check_image(img, self.channels, self.image_size, self.patch_size, type(self).__name__)
        x = self.to_patch_embedding(img)
        B = x.shape[0]
        x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
        x = x + self.pos_embedding[: x.shape[1]]
        if distill_token is not None:
            x = torch.cat((x, distill_token.expand(B, -1, -1)), dim=1)
        x = self.transformer(self.dropout(x))
        if distill_token is not None:
            x, distill_out = x[:, :-1], x[:, -1]
        x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
        out = self.mlp_head(self.to_latent(x))
        return (out, distill_out) if distill_token is not None else out


class DistillWrapper(nn.Module):
    """vit-pytorch's ``DistillWrapper``: ``forward(img, labels)`` returns the DeiT training loss
    ``(1 - alpha) * CE(student, labels) + alpha * distill_loss``; the teacher (any module mapping images
    to logits) runs without gradients. Keys ``distillation_token``, ``teacher.*``, ``student.*``,
    ``distill_mlp.*``."""

    def __init__(self, *, teacher: nn.Module, student: DistillableViT, temperature: float = 1.0, alpha: float = 0.5,
                 hard: bool = False, mlp_layernorm: bool = False):
        super().__init__()
        if not isinstance(student, DistillableViT):
            raise TypeError(f"DistillWrapper: student must be a fastvit_kernels DistillableViT, "
                            f"got {type(student).__name__}")
        self.teacher = teacher
        self.student = student
        dim, num_classes = student.dim, student.num_classes
        self.temperature = temperature
        self.alpha = alpha
        self.hard = hard
        self.distillation_token = nn.Parameter(torch.randn(1, dim))
        self.distill_mlp = nn.Sequential(nn.LayerNorm(dim) if mlp_layernorm else nn.Identity(),
                                         nn.Linear(dim, num_classes))

    def forward(self, img: Tensor, labels: Tensor, temperature: Optional[float] = None,
                alpha: Optional[float] = None, **kwargs) -> Tensor:
        alpha = self.alpha if alpha is None else alpha
        T = self.temperature if temperature is None else temperature
        with torch.no_grad():
            teacher_logits = self.teacher(img)
        student_logits, distill_tokens = self.student(img, distill_token=self.distillation_token, **kwargs)
        distill_logits = self.distill_mlp(distill_tokens)
        loss = F.cross_entropy(student_logits, labels)
        if self.hard:
            distill_loss = F.cross_entropy(distill_logits, teacher_logits.argmax(dim=-1))
        else:
            distill_loss = F.kl_div(F.log_softmax(distill_logits / T, dim=-1),
                                    F.softmax(teacher_logits / T, dim=-1), reduction="batchmean") * T ** 2
        return loss * (1 - alpha) + distill_loss * alpha

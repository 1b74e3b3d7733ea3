"""Knowledge distillation from the parent: the fine-tuning option every policy can use.

Loss = (1 - weight) * CE(student, y) + weight * T^2 * KL(softmax(teacher / T) || softmax(student / T))
(Hinton et al., 2015; the T^2 keeps the soft-target gradients on the scale of the hard ones).
The teacher sees the batch at its own (native) resolution; the student at the subnet's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class DistillConfig(BaseModel):
    """Distillation weight and temperature; weight 0 turns distillation off."""

    model_config = ConfigDict(extra="forbid")

    weight: float = Field(default=0.0, ge=0.0, le=1.0, description="share of the KD term in the loss (0 = off)")
    temperature: float = Field(default=4.0, gt=0.0, description="softmax temperature of both logit sets")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over the batch of KL(p_teacher || p_student) on temperature-softened logits.

    >>> z = torch.randn(4, 10)
    >>> float(kd_loss(z, z, 4.0)) == 0.0
    True
    """
    t = temperature
    log_p_student = F.log_softmax(student_logits / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="batchmean") * t * t


def distilled_loss(student_logits: torch.Tensor, y: torch.Tensor, teacher_logits: torch.Tensor | None,
                   cfg: DistillConfig | None) -> torch.Tensor:
    """Cross-entropy, mixed with the KD term when a teacher and a positive weight are given."""
    ce = F.cross_entropy(student_logits, y)
    if teacher_logits is None or cfg is None or cfg.weight == 0.0:
        return ce
    return (1.0 - cfg.weight) * ce + cfg.weight * kd_loss(student_logits, teacher_logits, cfg.temperature)

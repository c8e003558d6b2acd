"""KnowledgeDistillation: the soft-target loss, how it mixes into any module's loss, and its errors."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from lightning_hybridcomp.artifacts import save_artifact
from lightning_hybridcomp.callbacks import KnowledgeDistillation, soft_target_loss
from tests._helpers import ClassifierSteps, fast_trainer, random_classification_data

SHAPE = (6,)


def _reference_soft_target_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    # Written out: sum_c p_t (log p_t - log p_s) per sample, averaged, times T^2.
    p_teacher = torch.exp(teacher / temperature) / torch.exp(teacher / temperature).sum(-1, keepdim=True)
    p_student = torch.exp(student / temperature) / torch.exp(student / temperature).sum(-1, keepdim=True)
    per_sample = (p_teacher * (p_teacher.log() - p_student.log())).sum(-1)
    return per_sample.mean() * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_soft_target_loss_against_a_reference(temperature) -> None:
    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 5, 7, generator=generator)
    torch.testing.assert_close(
        soft_target_loss(student, teacher, temperature),
        _reference_soft_target_loss(student, teacher, temperature),
    )
    assert float(soft_target_loss(teacher, teacher, temperature)) == pytest.approx(0.0, abs=1e-6)


class Student(ClassifierSteps):
    def __init__(self, returns: str = "tensor") -> None:
        super().__init__()
        self.net = nn.Linear(SHAPE[0], 3)
        self.returns = returns

    def forward(self, x: Tensor, scale: float = 1.0) -> Tensor:
        return self.net(x) * scale

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        if self.returns == "keyword":  # a forward called with keyword arguments only
            x, y = batch
            return F.cross_entropy(self(x=x, scale=1.0), y)
        loss = super().training_step(batch, batch_idx)
        return {"loss": loss, "kept": 1} if self.returns == "dict" else loss

    def configure_optimizers(self) -> Any:
        return torch.optim.SGD(self.parameters(), lr=1.0)


def _one_batch() -> DataLoader:
    return DataLoader(random_classification_data(16, SHAPE, num_classes=3), batch_size=16)


@pytest.mark.parametrize("returns", ["tensor", "dict", "keyword"])
def test_one_step_follows_the_gradient_of_the_mixed_loss(returns) -> None:
    torch.manual_seed(0)
    student, teacher = Student(returns), nn.Linear(SHAPE[0], 3)
    start = copy.deepcopy(student.net)
    x, y = next(iter(_one_batch()))
    alpha, temperature = 0.7, 3.0
    trainer = fast_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher, alpha, temperature)])
    trainer.fit(student, _one_batch())

    # Reference: one SGD step (lr 1) on (1 - alpha) * CE + alpha * T^2 KL, computed here by hand.
    logits = start(x)
    with torch.no_grad():
        target = teacher(x)
    mixed = (1 - alpha) * F.cross_entropy(logits, y) + alpha * _reference_soft_target_loss(
        logits, target, temperature
    )
    grads = torch.autograd.grad(mixed, list(start.parameters()))
    for after, before, grad in zip(student.net.parameters(), start.parameters(), grads):
        torch.testing.assert_close(after, before - grad, rtol=1e-5, atol=1e-6)
    logged = trainer.callback_metrics["distillation/soft_target_loss"]
    torch.testing.assert_close(logged, _reference_soft_target_loss(logits, target, temperature).detach())
    assert "training_step" not in student.__dict__  # fit over: the module's own step again
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training


def test_teacher_from_an_artifact_file(tmp_path) -> None:
    teacher = nn.Linear(SHAPE[0], 3).eval()
    path = tmp_path / "teacher.pt2"
    save_artifact(teacher, path, torch.randn(1, *SHAPE))
    callback = KnowledgeDistillation(path, alpha=1.0)
    x = torch.randn(4, *SHAPE)
    torch.testing.assert_close(callback.teacher(x), teacher(x))
    student = Student()
    fast_trainer(max_epochs=1, callbacks=[callback]).fit(student, _one_batch())
    with pytest.raises(ValueError, match="does not exist"):
        KnowledgeDistillation(tmp_path / "missing.pt2")
    (tmp_path / "corrupt.pt2").write_bytes(b"not an artifact")
    with pytest.raises(ValueError, match=r"corrupt\.pt2"):
        KnowledgeDistillation(tmp_path / "corrupt.pt2")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha": 0.0}, ValueError, r"`alpha` to be a float in \(0, 1\]"),
        ({"alpha": 1.5}, ValueError, r"`alpha` to be a float in \(0, 1\]"),
        ({"temperature": 0}, ValueError, "`temperature` to be a positive number"),
        ({"temperature": "4"}, ValueError, "`temperature` to be a positive number"),
        ({"teacher": 3}, TypeError, "`teacher` to be an artifact path"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        KnowledgeDistillation(**{"teacher": nn.Linear(SHAPE[0], 3), **kwargs})


class NoForward(Student):
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.net(x), y)  # bypasses forward: nothing to distill into


class ManualOptimization(Student):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


@pytest.mark.parametrize(
    ("student", "teacher_classes", "error", "match"),
    [
        (NoForward, 3, ValueError, "called no forward of the module"),
        (Student, 4, ValueError, r"teacher's logits to have the student's shape \(16, 3\), got \(16, 4\)"),
        (ManualOptimization, 3, ValueError, "manual optimization"),
    ],
)
def test_modules_it_cannot_distill_into_are_named(student, teacher_classes, error, match) -> None:
    module = student()
    callback = KnowledgeDistillation(nn.Linear(SHAPE[0], teacher_classes))
    with pytest.raises(error, match=match):
        fast_trainer(max_steps=1, callbacks=[callback]).fit(module, _one_batch())
    assert "training_step" not in module.__dict__


def test_manual_optimization_is_refused_before_training() -> None:
    module = ManualOptimization()
    weights = [p.detach().clone() for p in module.parameters()]
    trainer = fast_trainer(max_steps=1, callbacks=[KnowledgeDistillation(nn.Linear(SHAPE[0], 3))])
    with pytest.raises(ValueError, match="manual optimization does not use"):
        trainer.callbacks[0].setup(trainer, module, "fit")  # what the pipeline's checks call
    with pytest.raises(ValueError, match="manual optimization does not use"):
        trainer.fit(module, _one_batch())
    assert trainer.global_step == 0
    assert all(torch.equal(p, w) for p, w in zip(module.parameters(), weights))


class KeywordOnly(Student):
    def forward(self, *, image: Tensor, scale: float = 1.0) -> Tensor:  # type: ignore[override]
        return self.net(image) * scale

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self(image=x, scale=2.0), y)


def test_a_teacher_that_takes_the_students_arguments_is_called_with_them() -> None:
    torch.manual_seed(0)
    student = KeywordOnly()
    teacher = copy.deepcopy(student)
    torch.nn.init.normal_(teacher.net.weight)
    x, _ = next(iter(_one_batch()))
    with torch.no_grad():
        student_logits, teacher_logits = student(image=x, scale=2.0), teacher(image=x, scale=2.0)
    trainer = fast_trainer(max_steps=1, callbacks=[KnowledgeDistillation(teacher, 0.5, 2.0)])
    trainer.fit(student, _one_batch())
    torch.testing.assert_close(
        trainer.callback_metrics["distillation/soft_target_loss"],
        _reference_soft_target_loss(student_logits, teacher_logits, 2.0),
    )

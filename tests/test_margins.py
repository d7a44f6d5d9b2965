"""Margins against their closed forms, gradcheck, and finite gradients at cos = +-1."""
import math

import pytest
import torch

from hybrid_fc import ArcFace, CombinedMarginLoss, CosFace


def test_arcface_closed_form_and_fallback():
    m = 0.5
    arc = ArcFace(64.0, m)
    theta = torch.linspace(0.0, math.pi, 1001, dtype=torch.float64)
    out = arc(torch.cos(theta))
    expected = torch.where(theta + m <= math.pi, torch.cos(theta + m), torch.cos(theta) - m * math.sin(m))
    # Away from cos = +-1 the sqrt floor (1e-6 under 1 - cos^2) is inactive: exact to float64.
    inner = (theta > 2e-3) & (theta < math.pi - 2e-3)
    assert torch.allclose(out[inner], expected[inner], atol=1e-12, rtol=0)
    assert arc.scale == 64.0


def test_cosface_and_combined_equal_their_special_cases():
    cos = torch.linspace(-0.999, 0.999, 513, dtype=torch.float64)
    assert torch.allclose(CosFace(30.0, 0.35)(cos), cos - 0.35, atol=0, rtol=0)
    assert torch.allclose(CombinedMarginLoss(64, 1.0, 0.5, 0.0)(cos), ArcFace(64, 0.5)(cos), atol=1e-15)
    assert torch.allclose(CombinedMarginLoss(64, 1.0, 0.0, 0.4)(cos), cos - 0.4, atol=1e-15)
    sphere = CombinedMarginLoss(64, 1.35, 0.0, 0.0)(cos)
    theta = torch.acos(cos)
    assert torch.allclose(sphere, torch.cos(torch.clamp(1.35 * theta, max=math.pi)), atol=1e-12)


@pytest.mark.parametrize("margin", [ArcFace(64.0, 0.5), CosFace(64.0, 0.4),
                                    CombinedMarginLoss(64.0, 1.0, 0.3, 0.2),
                                    CombinedMarginLoss(64.0, 1.2, 0.1, 0.0)])
def test_gradcheck(margin):
    # Points away from the branch switch (theta + m = pi) and from cos = +-1 (the sqrt floor).
    cos = torch.tensor([-0.8, -0.3, 0.0, 0.2, 0.55, 0.9, 0.97], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(margin, (cos,))


def test_arcface_exact_gradient_matches_derivative():
    m = 0.5
    cos = torch.tensor([0.1, 0.5, 0.8], dtype=torch.float64, requires_grad=True)
    ArcFace(64.0, m)(cos).sum().backward()
    # d/dx cos(acos(x) + m) = cos(m) + sin(m) * x / sqrt(1 - x^2)
    x = cos.detach()
    assert torch.allclose(cos.grad, math.cos(m) + math.sin(m) * x / torch.sqrt(1 - x * x), atol=1e-12)


@pytest.mark.parametrize("margin", [ArcFace(64.0, 0.5), CombinedMarginLoss(64.0, 1.3, 0.2, 0.1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_finite_gradient_at_the_poles(margin, dtype):
    cos = torch.tensor([-1.0, 1.0, 1.0 - 1e-9, -1.0 + 1e-9], dtype=dtype, requires_grad=True)
    out = margin(cos)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(cos.grad).all(), cos.grad


def test_straight_through_reproduces_insightface_no_grad_margin():
    cos = torch.tensor([0.1, 0.5, 0.8], requires_grad=True)
    st = ArcFace(64.0, 0.5, straight_through=True)
    out = st(cos)
    out.sum().backward()
    assert torch.allclose(out.detach(), ArcFace(64.0, 0.5)(cos.detach()))
    assert torch.equal(cos.grad, torch.ones(3))  # gradient of the plain cosine


@pytest.mark.parametrize("make, match", [
    (lambda: ArcFace(0.0, 0.5), "scale"),
    (lambda: ArcFace(64.0, 2.0), "ArcFace margin"),
    (lambda: CosFace(64.0, -0.1), "CosFace margin"),
    (lambda: CombinedMarginLoss(64.0, 0.5, 0.1, 0.0), "m1"),
    (lambda: ArcFace(float("nan"), 0.5), "scale"),
])
def test_bad_margin_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make()

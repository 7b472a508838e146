"""Attacks judged slice by slice: the noise attack's draw depends on the slice, never on the batch."""

from __future__ import annotations

import zlib

import pytest
import torch

from mriadv.attacks import NoiseAttack
from mriadv.data.transforms import Batch
from mriadv.perturbations import squared_norm
from mriadv.runtime import Runtime

CPU = Runtime.resolve("cpu", "fp32")
SLICES = [("file1000001.h5", 3), ("file1000001.h5", 4), ("file1000002.h5", 3), ("file1000007.h5", 0)]


def batch_of(keys: list[tuple[str, int]], size: int = 16) -> Batch:
    """A batch of the given (file, slice) pairs; each slice's image is a function of its key alone."""
    images = []
    for fname, s in keys:
        g = torch.Generator().manual_seed(zlib.crc32(f"{fname}/{s}".encode()))
        images.append(torch.randn(1, size, size, generator=g))
    image = torch.stack(images)
    b = len(keys)
    return Batch(
        image=image,
        target=image.clone(),
        mean=torch.zeros(b),
        std=torch.ones(b),
        max_value=torch.full((b,), 3.0),
        fnames=[f for f, _ in keys],
        slice_nums=torch.tensor([s for _, s in keys]),
    )


def noise_by_slice(keys: list[tuple[str, int]], budget: float) -> dict[tuple[str, int], torch.Tensor]:
    out = NoiseAttack(budget)(torch.nn.Identity(), batch_of(keys), CPU)
    assert torch.allclose(out.delta_sq, torch.full((len(keys),), budget), rtol=1e-5)  # on the sphere
    assert torch.allclose(squared_norm(out.inputs - batch_of(keys).image), torch.full((len(keys),), budget), rtol=1e-4)
    return {k: out.delta[i] for i, k in enumerate(keys)}


@pytest.mark.parametrize("budget", [1.0, 40.0])
def test_noise_of_a_slice_does_not_depend_on_its_batch(budget):
    alone = {k: noise_by_slice([k], budget)[k] for k in SLICES}
    compositions = [SLICES, SLICES[::-1], SLICES[:2], SLICES[2:], [SLICES[3], SLICES[0]], SLICES[1:3]]
    for keys in compositions:
        for k, delta in noise_by_slice(keys, budget).items():
            assert torch.equal(delta, alone[k]), (k, keys)
    # different slices (even of one file) get different directions
    flat = torch.stack([alone[k].flatten() for k in SLICES])
    cos = torch.nn.functional.normalize(flat, dim=1) @ torch.nn.functional.normalize(flat, dim=1).T
    assert torch.all(cos.fill_diagonal_(0).abs() < 0.5)


# --- relative budgets, random starts, restarts, best iterate, deviation objective ---------------------
from mriadv.attacks import PGDAttack  # noqa: E402
from mriadv.data.transforms import image_from_normalized_kspace  # noqa: E402
from mriadv.models import UNet  # noqa: E402
from mriadv.perturbations import random_start, reference_norm, relative_radius, relative_size, restrict  # noqa: E402


def kspace_batch(b: int = 3, H: int = 20, W: int = 18, crop: int = 16, seed: int = 0) -> Batch:
    """A batch that carries normalised masked k-space ``(b, H, W)``, its column mask and the network
    input computed from them as the data transform does; the target is the input plus noise."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, W, generator=g) < 0.35
    mask[:, W // 2 - 2 : W // 2 + 2] = True
    kspace = torch.randn(b, H, W, dtype=torch.complex64, generator=g) * mask[:, None, :]
    mean, std = torch.rand(b, generator=g), torch.ones(b)
    image = image_from_normalized_kspace(kspace, mean, std, (crop, crop), 6.0)
    return Batch(
        image=image,
        target=image + 0.3 * torch.randn(image.shape, generator=g),
        mean=mean,
        std=std,
        max_value=torch.full((b,), 3.0),
        fnames=[f"file{i}.h5" for i in range(b)],
        slice_nums=torch.arange(b),
        kspace=kspace,
        mask=mask,
    )


def tiny_unet(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return UNet(1, 1, 4, 2).eval()


def error(model, batch, inputs, reference=None) -> torch.Tensor:
    """``||f(inputs) - reference||^2`` per slice (default reference: the target), computed anew."""
    with torch.no_grad():
        out = model(inputs)
    return (out - (batch.target if reference is None else reference)).pow(2).flatten(1).sum(1)


def test_relative_budgets_equal_their_definition_on_a_hand_made_batch():
    # k-space: the sampled columns of slice i hold the constant c_i, 1 + i of its 6 columns are
    # sampled, so ||y|| = c_i sqrt(H (1 + i)); entries outside the mask are ignored even if non-zero
    b, H, W, crop = 3, 8, 6, 4
    c = torch.tensor([1.0, 2.0, 0.5])
    mask = torch.zeros(b, W, dtype=torch.bool)
    for i in range(b):
        mask[i, : 1 + i] = True
    kspace = torch.where(mask[:, None, :], c.view(-1, 1, 1), torch.full((b, 1, 1), 7.0)).expand(b, H, W)
    kspace = kspace.to(torch.complex64) * (1 + 1j) / 2**0.5  # |entry| = c_i
    image = torch.full((b, 1, crop, crop), 2.0) * torch.tensor([1.0, -1.0, 3.0]).view(-1, 1, 1, 1)
    batch = Batch(
        image=image,
        target=torch.zeros_like(image),
        mean=torch.zeros(b),
        std=torch.ones(b),
        max_value=torch.ones(b),
        fnames=["a.h5", "b.h5", "c.h5"],
        slice_nums=torch.arange(b),
        kspace=kspace,
        mask=mask,
    )
    y_norm = c * torch.sqrt(H * torch.arange(1.0, b + 1))
    x_norm = torch.tensor([2.0, 2.0, 6.0]) * crop  # |value| sqrt(crop^2)
    assert torch.allclose(reference_norm(batch, "kspace"), y_norm, rtol=1e-6)
    assert torch.allclose(reference_norm(batch, "image"), x_norm, rtol=1e-6)
    assert torch.allclose(relative_radius(batch, 0.05, "kspace"), 0.05 * y_norm, rtol=1e-6)
    assert torch.allclose(relative_radius(batch, 0.1, "image"), 0.1 * x_norm, rtol=1e-6)
    # noise at a relative budget is on the sphere; k-space noise only on the acquired columns
    for domain, ref in (("image", x_norm), ("kspace", y_norm)):
        out = NoiseAttack(float("nan"), rel=0.05, domain=domain)(torch.nn.Identity(), batch, CPU)
        assert torch.allclose(out.delta_sq.sqrt() / ref, torch.full((b,), 0.05), rtol=1e-5)
        assert torch.allclose(out.relative, torch.full((b,), 0.05), rtol=1e-5)
    assert torch.all(out.delta[~mask[:, None, :].expand(b, H, W)] == 0)
    # PGD at a relative budget delivers ||delta|| / ||ref|| <= rel (here: on the sphere; no clamp, which
    # would saturate on this unnormalised k-space)
    for domain, ref in (("image", x_norm), ("kspace", y_norm)):
        out = PGDAttack(float("nan"), 5, domain=domain, clamp=None, rel=0.05)(torch.nn.Identity(), batch, CPU)
        assert torch.allclose(out.relative, out.delta_sq.sqrt() / ref, rtol=1e-6)
        assert torch.all(out.relative <= 0.05 * (1 + 1e-5)) and torch.allclose(
            out.relative, torch.full((b,), 0.05), rtol=1e-4
        )
    with pytest.raises(ValueError, match="not both"):
        PGDAttack(10.0, rel=0.05)


@pytest.mark.parametrize("domain", ["image", "kspace"])
@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_random_start_lies_in_the_ball_and_depends_on_the_slice_only(domain, kind):
    batch = kspace_batch()
    radius = relative_radius(batch, 0.1, domain)
    start = random_start(batch, domain, radius, kind, salt=3)
    assert torch.all(relative_size(start, batch, domain) <= 0.1 * (1 + 1e-5))
    assert torch.all(relative_size(start, batch, domain) > 0.1 * 0.8)  # high dimension: near the sphere
    assert torch.equal(start, restrict(start, batch, domain, True))  # nothing on unacquired columns
    # the same slice alone gets the same start; another salt, another start
    one = Batch(**{k: (v[1:2] if isinstance(v, torch.Tensor) else v[1:2]) for k, v in vars(batch).items()})
    assert torch.equal(random_start(one, domain, radius[1:2], kind, salt=3)[0], start[1])
    assert not torch.equal(random_start(batch, domain, radius, kind, salt=4), start)


def old_pgd(model, batch, budget, steps, step_scale=2.5):
    """The seed's image-domain PGD as it was written before restarts existed (an independent copy)."""
    radius = budget**0.5
    delta = torch.zeros_like(batch.image)
    for _ in range(steps):
        delta.requires_grad_(True)
        err = (model(batch.image + delta) - batch.target).pow(2).sum()
        (grad,) = torch.autograd.grad(err, delta)
        with torch.no_grad():
            gnorm = grad.pow(2).flatten(1).sum(1).sqrt().clamp_min(1e-12).view(-1, 1, 1, 1)
            delta = delta.detach() + step_scale * radius / steps * grad / gnorm
            sq = delta.pow(2).flatten(1).sum(1)
            delta = delta * torch.clamp(torch.sqrt(budget / sq.clamp_min(1e-30)), max=1.0).view(-1, 1, 1, 1)
    return delta


def test_default_pgd_is_the_seeds_deterministic_attack():
    model, batch = tiny_unet(), kspace_batch()
    for p in model.parameters():
        p.requires_grad_(False)
    want = old_pgd(model, batch, 4.0, 4)
    assert torch.equal(PGDAttack(4.0, 4)(model, batch, CPU).delta, want)
    traced = PGDAttack(4.0, 4, trace_first=True)
    assert torch.equal(traced(model, batch, CPU).delta, want)  # recording the trace changes nothing
    assert torch.equal(traced(model, batch, CPU).delta, want)  # deterministic


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_restarts_never_return_a_worse_perturbation(domain):
    model, batch = tiny_unet(), kspace_batch(b=4)
    kw = dict(steps=3, domain=domain, rel=0.2, random_start="uniform")
    one = PGDAttack(float("nan"), **kw)(model, batch, CPU)
    many = PGDAttack(float("nan"), restarts=4, **kw)(model, batch, CPU)
    e1, e4 = error(model, batch, one.inputs), error(model, batch, many.inputs)
    assert torch.all(e4 >= e1) and torch.any(e4 > e1)
    assert torch.all(many.relative <= 0.2 * (1 + 1e-5))
    with pytest.raises(ValueError, match="random start"):
        PGDAttack(1.0, restarts=2)


@pytest.mark.parametrize("domain", ["image", "kspace"])
def test_best_iterate_is_never_worse_than_the_last(domain):
    model, batch = tiny_unet(1), kspace_batch(b=4, seed=1)
    kw = dict(steps=6, step_scale=8.0, domain=domain, rel=0.3)  # long steps: the last iterate overshoots
    last = PGDAttack(float("nan"), **kw)(model, batch, CPU)
    best = PGDAttack(float("nan"), keep_best=True, **kw)(model, batch, CPU)
    e_best, e_last = error(model, batch, best.inputs), error(model, batch, last.inputs)
    assert torch.all(e_best >= e_last) and torch.any(e_best > e_last)


@pytest.mark.parametrize("kind", ["uniform", "gaussian"])
def test_deviation_objective_with_the_identity_reaches_the_budget(kind):
    # f = identity: ||f(x + delta) - f(x)||^2 = ||delta||^2, maximal (= the budget) anywhere on the sphere
    batch, identity = kspace_batch(), torch.nn.Identity()
    out = PGDAttack(5.0, 4, objective="deviation", random_start=kind)(identity, batch, CPU)
    dev = error(identity, batch, out.inputs, reference=batch.image)
    assert torch.allclose(dev, torch.full_like(dev, 5.0), rtol=1e-5)
    rel = PGDAttack(float("nan"), 4, objective="deviation", random_start=kind, rel=0.1)(identity, batch, CPU)
    dev = error(identity, batch, rel.inputs, reference=batch.image)
    assert torch.allclose(dev, (0.1 * reference_norm(batch, "image")) ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match="zero gradient"):
        PGDAttack(5.0, objective="deviation")


def test_trace_records_the_first_batch_per_step():
    model, batch = tiny_unet(), kspace_batch()
    attack = PGDAttack(4.0, 5, random_start="gaussian", restarts=2, trace_first=True)
    out = attack(model, batch, CPU)
    assert len(attack.trace) == 2 and all(len(run) == 6 for run in attack.trace)
    best_run = max(attack.trace, key=lambda run: run[-1])
    assert error(model, batch, out.inputs).mean().item() >= best_run[-1] * (1 - 1e-6)
    untraced = PGDAttack(4.0, 5)
    untraced(model, batch, CPU)
    assert untraced.trace is None  # off by default (an attack made every training step would pay for it)
    zero = PGDAttack(4.0, 5, trace_first=True)
    zero(model, batch, CPU)
    assert zero.trace[0][0] == pytest.approx(error(model, batch, batch.image).mean().item(), rel=1e-6)  # clean
    first = zero.trace
    zero(model, kspace_batch(seed=5), CPU)
    assert zero.trace is first  # later batches leave it alone


def test_pgd_defaults_are_the_configs_and_leave_the_model_as_it_was():
    from mriadv.config import TrainConfig

    cfg, pgd = TrainConfig(), PGDAttack(4.0)
    assert (pgd.steps, pgd.step_scale, pgd.clamp) == (cfg.pgd_steps, cfg.pgd_step_scale, cfg.clamp)
    model, batch = tiny_unet(), kspace_batch()
    model.head[0].weight.requires_grad_(False)
    flags = [p.requires_grad for p in model.parameters()]
    pgd(model, batch, CPU)
    assert [p.requires_grad for p in model.parameters()] == flags and not all(flags) and any(flags)
    assert all(p.grad is None for p in model.parameters())  # gradients w.r.t. the input only

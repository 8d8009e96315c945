"""The diffusion core: schedules, the exact DDPM -> velocity conversion, samplers, routing.

Oracle tests run in float64 with analytic optimal predictors (no training).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from oracle import GaussianMixture  # tests/oracle.py: analytic predictors

from hdd_ray.diffusion import (
    FM_TIME_SCALE,
    Safeguards,
    as_velocity,
    drop_captions,
    edge_snr,
    get_objective,
    get_schedule,
    guided,
    sample_ode,
    time_grid,
)
from hdd_ray.ensemble import MixtureField, route

F64 = torch.float64


def gaussian() -> GaussianMixture:
    cov = torch.tensor([[1.0, 0.6, 0.0], [0.6, 0.5, 0.1], [0.0, 0.1, 0.3]], dtype=F64)
    return GaussianMixture(torch.ones(1), torch.tensor([[0.5, -1.0, 2.0]]), cov[None])


def mixture() -> GaussianMixture:
    means = torch.tensor([[-2.0, 0.0, 1.0], [2.0, 1.0, -1.0], [0.0, -2.5, 0.5]], dtype=F64)
    base = torch.eye(3, dtype=F64)
    covs = torch.stack([0.3 * base, 0.2 * base + 0.05, torch.diag(torch.tensor([0.4, 0.1, 0.2]))])
    return GaussianMixture(torch.tensor([0.5, 0.3, 0.2]), means, covs)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


T_GRID = torch.cat([torch.linspace(0.001, 0.999, 41, dtype=F64), torch.tensor([0.5 + 1e-9])])


# ----------------------------------------------------------------------------- schedules


def test_linear_schedule_matches_ddpm_cumulative_product_at_integer_steps():
    sched = get_schedule("linear")
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=F64)
    cumprod = torch.cumprod(1 - betas, 0)
    n = torch.arange(1, 1001, dtype=F64)
    assert torch.allclose(sched.alpha_bar(n), cumprod, rtol=1e-12, atol=0)
    assert float(sched.alpha_bar(torch.zeros(1, dtype=F64))) == 1.0


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_schedule_is_continuous_decreasing_and_inverse_is_exact(name):
    sched = get_schedule(name)
    tau = torch.linspace(0.0, 999.5, 5001, dtype=F64) + 0.25  # non-integer taus
    abar = sched.alpha_bar(tau)
    assert torch.all(abar[1:] < abar[:-1])
    back = sched.tau_of_alpha_bar(abar)
    assert float((back - tau).abs().max()) < 1e-8


def test_cosine_schedule_closed_form_and_ends_at_pure_noise():
    sched = get_schedule("cosine")
    tau = torch.tensor([0.0, 250.0, 500.0, 1000.0], dtype=F64)
    s = 0.008
    f = torch.cos((tau / 1000 + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert torch.allclose(sched.alpha_bar(tau), f / f0, rtol=1e-14)
    assert float(sched.alpha_bar(torch.tensor([1000.0], dtype=F64))) < 1e-30


def test_unknown_schedule_names_the_allowed_ones():
    with pytest.raises(ValueError, match="allowed: linear, cosine"):
        get_schedule("quadratic")


# ----------------------------------------------------------------------------- conversion


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
@pytest.mark.parametrize("data", [gaussian, mixture], ids=["gaussian", "mixture"])
def test_optimal_vp_predictor_converted_equals_optimal_fm_velocity(schedule_name, parameterization, data):
    """ARCHITECTURE.md "Conversion": with exact predictors the conversion is exact (float64, <= 1e-8 relative)."""
    gm = data()
    sched = get_schedule(schedule_name)
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for t in T_GRID:
        # clamp_tau off: at t -> 1 the linear schedule's range ends before abar* and only the
        # unclamped (extrapolated) tau* keeps the SNR match exact.
        field = as_velocity(
            gm.vp_predictor(sched, parameterization), parameterization, sched,
            Safeguards(clamp_tau=False, min_one_minus_t=1e-12),
        )
        x0, _ = gm.sample(256, g)
        eps = torch.randn(x0.shape, dtype=F64, generator=g)
        tt = torch.full((256,), float(t), dtype=F64)
        x_t = (1 - tt[:, None]) * x0 + tt[:, None] * eps
        if schedule_name == "linear" and float(t) > 0.99:
            continue  # beyond abar(T): covered by the clamp test below
        worst = max(worst, rel_err(field(x_t, tt), gm.fm_velocity()(x_t, tt)))
    print(f"max relative error {schedule_name}/{parameterization}/{data.__name__}: {worst:.2e}")
    assert worst <= 1e-8


def test_conversion_inside_schedule_range_is_exact_with_default_safeguards():
    """Default safeguards change nothing where t is inside the expert's edge."""
    gm, sched = mixture(), get_schedule("linear")
    field = as_velocity(gm.vp_predictor(sched, "eps"), "eps", sched)  # defaults
    t_edge = 1 / (1 + edge_snr("eps", sched, Safeguards()))
    g = torch.Generator().manual_seed(1)
    x0, _ = gm.sample(512, g)
    t = torch.rand(512, dtype=F64, generator=g) * (t_edge - 0.006) + 0.005
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(x0.shape, dtype=F64, generator=g)
    assert rel_err(field(x_t, t), gm.fm_velocity()(x_t, t)) <= 1e-8


def test_conversion_queries_continuous_tau_and_rescaled_input():
    sched = get_schedule("cosine")
    seen = {}

    def predict(x_in, tau, cond):
        seen["x_in"], seen["tau"] = x_in, tau
        return torch.zeros_like(x_in)

    x_t = torch.randn(4, 3, dtype=F64)
    t = torch.tensor([0.1, 0.37, 0.5, 0.9], dtype=F64)
    as_velocity(predict, "eps", sched)(x_t, t)
    s = torch.sqrt((1 - t) ** 2 + t**2)
    assert torch.allclose(seen["x_in"], x_t / s[:, None])
    assert torch.allclose(sched.alpha_bar(seen["tau"]), ((1 - t) / s) ** 2, rtol=1e-12)
    assert not torch.allclose(seen["tau"], seen["tau"].round())  # never rounded to steps


def test_velocity_parameterization_is_passed_through():
    gm = gaussian()
    field = as_velocity(gm.fm_velocity(), "velocity")
    x = torch.randn(8, 3, dtype=F64)
    t = torch.full((8,), 0.3, dtype=F64)
    assert torch.equal(field(x, t), gm.fm_velocity()(x, t))


def test_unknown_parameterization_and_missing_schedule_fail_clearly():
    with pytest.raises(ValueError, match="unknown parameterization 'score'"):
        as_velocity(lambda x, t, c: x, "score")
    with pytest.raises(ValueError, match="needs a VP schedule"):
        as_velocity(lambda x, t, c: x, "eps")


# ----------------------------------------------------------------------------- near t = 1


@pytest.fixture(scope="module")
def trajectories():
    """The mixture's FM trajectories from one noise: Heun at 32 and 100 steps and a reference."""
    gm = mixture()
    # 1000 draws: the ratio is a norm over samples, and a few hundred leave it noisy
    noise = torch.randn(1000, 3, dtype=F64, generator=torch.Generator().manual_seed(10))
    fm = gm.fm_velocity()
    ref = sample_ode(fm, noise, steps=640, sampler="heun")  # Heun's error ~1/N^2: 40x below 100's
    runs = {n: sample_ode(fm, noise, steps=n, sampler="heun") for n in (32, 100)}
    return gm, noise, ref, runs


def _deviation_ratio(trajectories, field, steps: int) -> float:
    """Deviation from the FM trajectory of the same noise, in units of the sampler's own error."""
    _, noise, ref, runs = trajectories
    converted = sample_ode(field, noise, steps=steps, sampler="heun")
    return float((converted - runs[steps]).norm() / (runs[steps] - ref).norm())


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("parameterization,steps", [("eps", 32), ("x0", 32), ("v", 32), ("eps", 100)])
def test_converted_ddpm_trajectory_stays_within_twice_the_sampler_error_of_fm(
        trajectories, schedule_name, parameterization, steps):
    """Issue 13's target: exact oracles, Heun, the defaults of as_velocity and sample_ode, the
    prior mean an expert carries (its data's mean): converted DDPM ~ FM from the same noise."""
    gm = trajectories[0]
    sched = get_schedule(schedule_name)
    field = as_velocity(gm.vp_predictor(sched, parameterization), parameterization, sched,
                        prior_mean=gm.mean())
    ratio = _deviation_ratio(trajectories, field, steps)
    print(f"{schedule_name}/{parameterization}/{steps} steps: {ratio:.2e} x the sampler's error")
    assert ratio <= 2.0


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_the_earlier_division_scheme_misses_the_target(trajectories, schedule_name):
    """What beyond_edge="shrink" changes: dividing by max(1 - t, 1e-3) at t = 1 (the earlier
    default) puts the converted trajectory many sampler errors away from FM's."""
    gm = trajectories[0]
    sched = get_schedule(schedule_name)
    field = as_velocity(gm.vp_predictor(sched, "eps"), "eps", sched,
                        Safeguards(beyond_edge="divide", min_one_minus_t=1e-3))
    ratio = _deviation_ratio(trajectories, field, 32)
    print(f"{schedule_name}/eps, divide: {ratio:.1f} x the sampler's error")
    assert ratio > 10.0


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_at_t_equal_1_the_velocity_is_the_exact_limit_x_minus_the_prior_mean(
        schedule_name, parameterization):
    gm, sched = mixture(), get_schedule(schedule_name)
    field = as_velocity(gm.vp_predictor(sched, parameterization), parameterization, sched,
                        prior_mean=gm.mean())
    x = torch.randn(64, 3, dtype=F64, generator=torch.Generator().manual_seed(11))
    t = torch.ones(64, dtype=F64)
    assert torch.allclose(field(x, t), x - gm.mean(), rtol=0, atol=1e-12)
    # ... which is the exact FM velocity there (the oracle's float32-given weights: ~6e-9)
    assert torch.allclose(gm.fm_velocity()(x, t), x - gm.mean(), rtol=0, atol=1e-7)


@pytest.mark.parametrize("schedule_name,parameterization",
                         [("linear", "eps"), ("linear", "x0"), ("linear", "v"), ("cosine", "eps")])
def test_the_conversion_is_continuous_across_the_edge(schedule_name, parameterization):
    """At r(t) = r_e the edge formula equals the inside one, for any predictor (not only exact
    ones): here a made-up one whose output depends on x_in and tau. (Cosine x0 / v experts
    have their edge at t = 1 itself: abar(T) = 0.)"""
    sched = get_schedule(schedule_name)
    r_e = edge_snr(parameterization, sched, Safeguards())
    assert r_e > 1e-3
    t_edge = 1 / (1 + r_e)

    def predict(x_in, tau, cond):
        return 0.7 * x_in + 0.3 * torch.sin(x_in) + 1e-3 * tau[:, None]

    field = as_velocity(predict, parameterization, sched, prior_mean=torch.tensor([0.2, -0.1, 0.4]))
    x = torch.randn(16, 3, dtype=F64, generator=torch.Generator().manual_seed(12))
    below, above = (torch.full((16,), t_edge + d, dtype=F64) for d in (-1e-10, 1e-10))
    jump = (field(x, below) - field(x, above)).abs().max()
    assert float(jump) < 1e-5 * float(field(x, below).abs().max())


def test_beyond_the_edge_without_a_prior_mean_the_edge_estimate_is_held():
    gm, sched = mixture(), get_schedule("cosine")
    m = 1e-2
    field = as_velocity(gm.vp_predictor(sched, "eps"), "eps", sched, Safeguards(min_one_minus_t=m))
    x = torch.randn(32, 3, dtype=F64, generator=torch.Generator().manual_seed(13))
    r_e = m / (1 - m)
    abar_e = torch.full((32,), r_e**2 / (1 + r_e**2), dtype=F64)
    for t_value in (0.995, 0.999, 1.0):
        t = torch.full((32,), t_value, dtype=F64)
        s = math.sqrt((1 - t_value) ** 2 + t_value**2)
        # E[x0 | x_in] as the expert sees it at the edge's SNR
        x0_held = gm.expectations(x / s, abar_e.sqrt(), (1 - abar_e).sqrt())[1]
        assert torch.allclose(x - t[:, None] * field(x, t), x0_held, rtol=0, atol=1e-9)


# ----------------------------------------------------------------------------- safeguards


@pytest.mark.parametrize("parameterization", ["eps", "x0"])
def test_safeguard_clamp_tau_keeps_tau_inside_the_schedule(parameterization):
    sched = get_schedule("linear")  # abar(T) ~ 4e-5 > 0: t near 1 asks for more noise than T
    taus = {}

    def predict(x_in, tau, cond):
        taus["tau"] = tau
        return torch.zeros_like(x_in)

    x = torch.randn(3, 3, dtype=F64)
    t = torch.tensor([1.0, 0.999, 0.5], dtype=F64)
    safe = Safeguards(clamp_tau=True, min_one_minus_t=1e-4)
    as_velocity(predict, parameterization, sched, safe)(x, t)
    clamped = taus["tau"].clone()
    as_velocity(predict, parameterization, sched, Safeguards(clamp_tau=False, min_one_minus_t=1e-4))(x, t)
    # beyond the schedule's end the expert is queried at its end (shrink) or past it (no clamp)
    assert torch.allclose(clamped[:2], torch.full((2,), 1000.0, dtype=F64), rtol=0, atol=1e-6)
    assert float(clamped.max()) <= 1000.0 and float(taus["tau"][1]) > 1000.0
    assert float(clamped[2]) == pytest.approx(float(taus["tau"][2]), abs=1e-9)  # inside: unchanged
    # the earlier scheme clamps too
    as_velocity(predict, parameterization, sched, dataclasses.replace(safe, beyond_edge="divide"))(x, t)
    assert float(taus["tau"][1]) == 1000.0


def test_safeguard_min_one_minus_t_is_the_eps_experts_edge():
    """With shrink it sets where an eps expert stops being divided by 1 - t: beyond t = 1 - m
    it is queried at the edge's tau; with divide it bounds the divisor."""
    sched = get_schedule("cosine")
    taus = {}
    residual = 0.01  # a predictor whose eps is off by 0.01

    def predict(x_in, tau, cond):
        taus["tau"] = tau
        return x_in + residual

    x = torch.randn(3, 2, dtype=F64)
    t = torch.full((3,), 0.995, dtype=F64)
    as_velocity(predict, "eps", sched, Safeguards(min_one_minus_t=1e-2))(x, t)
    r_e = 1e-2 / (1 - 1e-2)
    edge_tau = sched.tau_of_alpha_bar(torch.tensor([r_e**2 / (1 + r_e**2)], dtype=F64))
    assert torch.allclose(taus["tau"], edge_tau.expand(3), rtol=1e-12)
    as_velocity(predict, "eps", sched, Safeguards(min_one_minus_t=1e-3))(x, t)  # inside: SNR match
    s = math.sqrt(0.005**2 + 0.995**2)
    assert torch.allclose(sched.alpha_bar(taus["tau"]), torch.full((3,), (0.005 / s) ** 2, dtype=F64))

    t = torch.ones(3, dtype=F64)
    v3 = as_velocity(predict, "eps", sched, Safeguards(beyond_edge="divide", min_one_minus_t=1e-3))(x, t)
    v1 = as_velocity(predict, "eps", sched, Safeguards(beyond_edge="divide", min_one_minus_t=1e-1))(x, t)
    assert torch.isfinite(v3).all()
    assert torch.allclose(v3, torch.full_like(x, residual / 1e-3))
    assert torch.allclose(v1, torch.full_like(x, residual / 1e-1))


def test_safeguard_beyond_edge_shrink_is_bounded_where_divide_amplifies_the_error():
    """An eps expert that is slightly off at pure noise: dividing amplifies its error by
    1 / min_one_minus_t at t = 1, the edge scheme returns x - E[x0] whatever it predicts."""
    sched = get_schedule("linear")
    mean = torch.tensor([0.3, -0.2])

    def predict(x_in, tau, cond):
        return x_in + 0.05

    x = torch.randn(8, 2, dtype=F64)
    t = torch.ones(8, dtype=F64)
    shrink = as_velocity(predict, "eps", sched, prior_mean=mean)(x, t)
    divide = as_velocity(predict, "eps", sched, Safeguards(beyond_edge="divide", min_one_minus_t=1e-3),
                         prior_mean=mean)(x, t)
    assert torch.allclose(shrink, x - mean.to(F64), rtol=0, atol=1e-12)
    assert torch.allclose(divide, torch.full_like(x, 0.05 / 1e-3))  # the error, times 1000
    with pytest.raises(ValueError, match="unknown beyond_edge 'clip'"):
        as_velocity(predict, "eps", sched, Safeguards(beyond_edge="clip"))


def test_safeguard_x0_clamp_keeps_the_implied_clean_image_in_range():
    sched = get_schedule("cosine")

    def predict(x_in, tau, cond):
        return 1.3 * x_in  # off: x0_hat = (x_t - t eps_hat) / (1 - t) amplifies it near t = 1

    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 4, dtype=F64, generator=g)
    t = torch.full((64,), 0.9, dtype=F64)
    raw = as_velocity(predict, "eps", sched)(x, t)
    safe = as_velocity(predict, "eps", sched, Safeguards(x0_clamp=1.0))(x, t)
    x0_raw = x - t[:, None] * raw
    x0_safe = x - t[:, None] * safe
    assert float(x0_raw.abs().max()) > 3  # without it, x0_hat leaves the data range
    assert float(x0_safe.abs().max()) <= 1.0 + 1e-9
    inside = x0_raw.abs() <= 1.0
    assert inside.any() and torch.equal(safe[inside], raw[inside])  # in range: unchanged


# ----------------------------------------------------------------------------- DDM identity


@pytest.mark.parametrize("schedule_name", ["linear", "cosine"])
def test_posterior_weighted_expert_velocities_equal_the_mixture_velocity(schedule_name):
    """DDM identity: sum_k p(k | x_t) v_k(x_t) == v(x_t), one converted DDPM expert included."""
    gm = mixture()
    sched = get_schedule(schedule_name)
    experts = [
        as_velocity(gm.vp_predictor(sched, "eps", component=0), "eps", sched),
        gm.fm_velocity(component=1),
        as_velocity(gm.vp_predictor(sched, "v", component=2), "v", sched),
    ]
    g = torch.Generator().manual_seed(3)
    x0, _ = gm.sample(400, g)
    t = torch.rand(400, dtype=F64, generator=g) * 0.93 + 0.01  # inside the eps expert's edge
    x_t = (1 - t[:, None]) * x0 + t[:, None] * torch.randn(x0.shape, dtype=F64, generator=g)
    w = route(gm.fm_posterior(x_t, t), "full")
    mixed = MixtureField(experts, lambda x, s: w, strategy="full")(x_t, t)  # sum_k w_k v_k
    err = rel_err(mixed, gm.fm_velocity()(x_t, t))
    print(f"DDM identity relative error ({schedule_name}): {err:.2e}")
    assert err <= 1e-8
    sparse = MixtureField(experts, gm.fm_posterior, strategy="full")
    assert rel_err(sparse(x_t, t), gm.fm_velocity()(x_t, t)) <= 1e-8


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("sampler,steps,shift", [("euler", 200, 1.0), ("heun", 40, 3.0)])
def test_integrating_the_oracle_field_reproduces_the_target_mean_and_covariance(sampler, steps, shift):
    gm = gaussian()
    n = 20000
    noise = torch.randn(n, 3, dtype=F64, generator=torch.Generator().manual_seed(4))
    x = sample_ode(gm.fm_velocity(), noise, steps=steps, sampler=sampler, shift=shift)
    mean_err = (x.mean(0) - gm.mean()).abs().max()
    cov_err = (torch.cov(x.T) - gm.covariance()).abs().max()
    # sampling error of n = 20000 draws: ~ 1/sqrt(n) * std ~ 0.007
    assert float(mean_err) < 0.03, mean_err
    assert float(cov_err) < 0.05, cov_err


def test_converted_ddpm_oracle_samples_the_target_too():
    gm, sched = gaussian(), get_schedule("cosine")
    field = as_velocity(gm.vp_predictor(sched, "eps"), "eps", sched, prior_mean=gm.mean())
    noise = torch.randn(20000, 3, dtype=F64, generator=torch.Generator().manual_seed(5))
    x = sample_ode(field, noise, steps=60, sampler="heun", shift=1.0)
    assert float((x.mean(0) - gm.mean()).abs().max()) < 0.05
    assert float((torch.cov(x.T) - gm.covariance()).abs().max()) < 0.08


def test_heun_is_more_accurate_than_euler_at_equal_steps():
    gm = gaussian()
    noise = torch.randn(4000, 3, dtype=F64, generator=torch.Generator().manual_seed(6))
    ref = sample_ode(gm.fm_velocity(), noise, steps=400, sampler="heun")
    e = sample_ode(gm.fm_velocity(), noise, steps=10, sampler="euler")
    h = sample_ode(gm.fm_velocity(), noise, steps=10, sampler="heun")
    assert rel_err(h, ref) < 0.2 * rel_err(e, ref)


def test_time_grid_is_shifted_towards_noise():
    plain = time_grid(10, 1.0, dtype=F64)
    shifted = time_grid(10, 3.0, dtype=F64)
    assert float(plain[0]) == 1.0 and float(plain[-1]) == 0.0
    assert float(shifted[0]) == 1.0 and float(shifted[-1]) == 0.0
    assert torch.all(shifted[1:-1] > plain[1:-1])
    with pytest.raises(ValueError, match="steps=0"):
        time_grid(0)


def test_classifier_free_guidance_extrapolates_from_the_unconditional_field():
    def field(x, t, cond):
        drop = cond.get("drop", torch.zeros(x.shape[0], dtype=torch.bool))
        uncond = drop.to(x.dtype)[:, None]
        return x + (1 - uncond) * cond["tokens"][:, :, 0]  # conditional adds the token value

    x = torch.randn(5, 2, dtype=F64)
    t = torch.full((5,), 0.5, dtype=F64)
    cond = {"tokens": torch.full((5, 2, 1), 0.7, dtype=F64), "mask": torch.ones(5, 2, dtype=torch.bool)}
    assert torch.allclose(guided(field, 1.0)(x, t, cond), x + 0.7)
    assert torch.allclose(guided(field, 3.0)(x, t, cond), x + 3.0 * 0.7)


# ----------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("name", ["ddpm_eps", "fm_velocity"])
def test_objective_paths_and_targets(name):
    obj = get_objective(name, "cosine")
    g = torch.Generator().manual_seed(7)
    x0 = torch.randn(1000, 4, dtype=F64, generator=g)
    eps = torch.randn(1000, 4, dtype=F64, generator=g)
    time = obj.sample_time(1000, "cpu", g)
    x = obj.noise(x0, eps, time)
    if name == "fm_velocity":
        assert 0 <= float(time.min()) and float(time.max()) <= 1
        assert torch.allclose(x, x0 + time[:, None].to(F64) * obj.target(x0, eps, time))
        assert torch.allclose(obj.network_time(time), time * FM_TIME_SCALE)
    else:
        assert 0 <= float(time.min()) and float(time.max()) <= 1000
        assert float(time.max()) > 900 and not torch.equal(time, time.round())
        assert torch.equal(obj.target(x0, eps, time), eps)
        a = obj.schedule.alpha_bar(time)[:, None]
        assert torch.allclose(x, a.sqrt() * x0 + (1 - a).sqrt() * eps, atol=1e-6)


def test_objective_loss_is_zero_for_the_exact_target_and_positive_otherwise():
    obj = get_objective("fm_velocity")
    x0 = torch.zeros(16, 2)  # data at 0: the exact velocity is eps = x_t / t
    def exact(x, nt, cond):
        return x / (nt / FM_TIME_SCALE)[:, None]

    assert float(obj.loss(exact, x0)) < 1e-8
    assert float(obj.loss(lambda x, nt, c: torch.zeros_like(x), x0)) > 0.5


def test_caption_dropout_marks_the_configured_fraction():
    cond = {"tokens": torch.zeros(10000, 2, 3), "mask": torch.ones(10000, 2, dtype=torch.bool)}
    out = drop_captions(cond, 0.1, torch.Generator().manual_seed(8))
    assert abs(float(out["drop"].float().mean()) - 0.1) < 0.01
    assert drop_captions(cond, 0.0) is cond


def test_logit_normal_timesteps_concentrate_in_the_middle():
    obj = get_objective("fm_velocity", timestep_sampling="logit_normal")
    t = obj.sample_time(20000, "cpu", torch.Generator().manual_seed(9))
    mid = ((t > 0.25) & (t < 0.75)).float().mean()
    assert float(mid) > 0.6  # uniform would give 0.5
    with pytest.raises(ValueError, match="unknown objective"):
        get_objective("score_sde")


# ----------------------------------------------------------------------------- routing


def _probs(b: int = 64, k: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.softmax(torch.randn(b, k, generator=torch.Generator().manual_seed(seed)) * 2, 1)


@pytest.mark.parametrize("strategy,kw", [("full", {}), ("top1", {}), ("topk", {"k": 2}),
                                         ("topk", {"k": 3}), ("threshold", {"threshold": 0.2})])
def test_routing_weights_rows_sum_to_one_and_are_zero_outside_the_chosen_experts(strategy, kw):
    p = _probs()
    w = route(p, strategy, **kw)
    assert torch.allclose(w.sum(1), torch.ones(64))
    chosen = w > 0
    if strategy == "top1":
        assert torch.equal(chosen.sum(1), torch.ones(64, dtype=torch.long))
        assert torch.equal(w.argmax(1), p.argmax(1))
    if strategy == "topk":
        assert torch.equal(chosen.sum(1), torch.full((64,), kw["k"]))
        top = p.topk(kw["k"], 1).indices
        assert torch.all(torch.gather(chosen, 1, top))
        assert torch.allclose(torch.gather(w, 1, top), torch.gather(p, 1, top) / torch.gather(p, 1, top).sum(1, keepdim=True))
    if strategy == "threshold":
        assert torch.all(chosen.sum(1) >= 1)
        assert torch.all(chosen == ((p >= 0.2) | (p == p.max(1, keepdim=True).values)))
    if strategy == "full":
        assert torch.allclose(w, p / p.sum(1, keepdim=True))


def test_threshold_routing_keeps_at_least_one_expert_when_none_passes():
    p = torch.full((3, 4), 0.25)
    w = route(p, "threshold", threshold=0.9)
    assert torch.equal((w > 0).sum(1), torch.ones(3, dtype=torch.long))


def test_routing_rejects_bad_arguments():
    with pytest.raises(ValueError, match="top-k must be in 1..8"):
        route(_probs(), "topk", k=9)
    with pytest.raises(ValueError, match="unknown routing strategy 'best'"):
        route(_probs(), "best")
    with pytest.raises(ValueError, match="needs a threshold"):
        route(_probs(), "threshold")


@pytest.mark.parametrize("strategy,k,per_step", [("full", 2, 8), ("topk", 2, 2), ("top1", 1, 1), ("topk", 3, 3)])
def test_sparse_execution_evaluates_each_expert_only_on_its_routed_samples(strategy, k, per_step):
    batch, n_experts, steps = 32, 8, 5
    calls = []

    def make(j):
        def field(x, t, cond):
            calls.append((j, x.shape[0]))
            return torch.full_like(x, float(j))
        return field

    router = lambda x, t: _probs(x.shape[0], n_experts, seed=int(t[0] * 1000))  # noqa: E731
    mix = MixtureField([make(j) for j in range(n_experts)], router, strategy=strategy, k=k)
    x = sample_ode(mix, torch.zeros(batch, 2), steps=steps, sampler="euler")
    assert sum(mix.evaluations) == per_step * batch * steps
    assert sum(n for _, n in calls) == per_step * batch * steps
    assert torch.isfinite(x).all()


def test_a_mixture_assignment_may_leave_experts_out():
    from hdd_ray.choices import format_assignment, parse_assignment, parse_mixture
    from hdd_ray.config import ConfigError

    assert parse_mixture("D F - D", 4) == ([0, 3], [2])
    assert parse_mixture("DF-D", 4) == ([0, 3], [2])
    assert format_assignment([0, 3], 4, [2]) == "D F - D"
    with pytest.raises(ConfigError, match="every expert left out"):
        parse_mixture("- - -", 3)
    with pytest.raises(ConfigError, match="'-' .* is for mixtures"):  # training needs them all
        parse_assignment("D - F", 3)


@pytest.mark.parametrize("strategy,k", [("topk", 2), ("full", 2), ("top1", 1)])
def test_a_retired_expert_gets_zero_weight_at_every_step_and_is_never_run(strategy, k):
    """No training: the router's output for the left-out expert is masked and the others
    renormalised, in proportion; its network is not even loaded (None)."""
    from hdd_ray.config import load_config
    from hdd_ray.ensemble import Mixture, MixtureSpec, route
    from hdd_ray.errors import ConfigError
    from hdd_ray.models.expert import ExpertModel, RouterModel

    cfg = load_config(overrides=["clustering.k=3", "experts.ddpm_clusters=[]", "sampling.steps=3",
                                 "sampling.sampler=euler",
                                 f"sampling.routing={strategy}", f"sampling.k={k}"])
    text = {"encoder": "learned", "arch": None, "pretrained": None, "dim": 32, "depth": 1,
            "vocab_size": 64, "max_len": 8}
    torch.manual_seed(0)
    experts = [(ExpertModel("DiT-T/2", text, 8, 1).eval() if c != 1 else None,
                {"objective": "fm_velocity", "schedule": None, "image_size": 8, "channels": 1})
               for c in range(3)]
    router = RouterModel("router-T", 8, 1, 3).eval()
    with torch.no_grad():  # a router that prefers the retired expert: masking must still win
        router.net.head.bias[1] = 5.0
    mixture = Mixture(experts, router, cfg, retired=[1])
    seen = []
    probs_of = mixture.router_probs

    def recording(x_t, t):
        p = probs_of(x_t, t)
        full = torch.softmax(mixture.router(x_t, t * 1000.0).float(), dim=1)
        kept = full[:, [0, 2]] / full[:, [0, 2]].sum(dim=1, keepdim=True)
        assert torch.allclose(p[:, [0, 2]].float(), kept, atol=1e-5)  # renormalised in proportion
        seen.append(route(p.float(), strategy, k))
        return p

    mixture.router_probs = recording
    images = mixture.sample(["a", "b", "c", "d"], seed=0)
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    assert len(seen) == 3
    for w in seen:
        assert (w[:, 1] == 0).all() and torch.allclose(w.sum(dim=1), torch.ones(4))
    assert mixture.last_evaluations[1] == 0 and mixture.assignment == "F - F"
    spec = MixtureSpec.from_config(cfg, retired=[1])
    assert spec.assignment(3) == "F - F"
    with pytest.raises(ConfigError, match="top-k routing over 1 kept experts"):
        MixtureSpec.from_config(load_config(overrides=["clustering.k=3", "sampling.k=2",
                                                       "experts.ddpm_clusters=[]"]),
                                retired=[0, 2])

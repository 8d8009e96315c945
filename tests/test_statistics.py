"""Statistics of the comparison tables: bootstrap intervals that cover the truth, paired
differences, FID and its floor at one n, and the ± text in the tables.

Synthetic Gaussian features, where the expected FID at n is known by Monte Carlo; a few seconds.
"""

from __future__ import annotations

import types

import pytest
import torch

from hdd_ray.evaluation import statistics as st
from hdd_ray.evaluation.judge import EVALUATION_VERSION, Judge
from hdd_ray.evaluation.mixture import SAMPLES_FILE
from hdd_ray.evaluation.tables import comparison_table, summary


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Small batched eigensolves: a second thread on two shared cores only slows them down."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _reference(d: int) -> st.FrechetReference:
    return st.FrechetReference.from_moments(torch.zeros(d, dtype=torch.float64),
                                            torch.eye(d, dtype=torch.float64))


def _gaussian(n: int, d: int, shift: float, shape: tuple = (), gen=None) -> torch.Tensor:
    return torch.randn(*shape, n, d, generator=gen, dtype=torch.float64) + shift


def _scores(features, clip, group_div, prompts="p") -> st.SampleScores:
    return st.SampleScores(features, clip, group_div, st.prompts_hash([prompts]),
                           "feature_diversity")


def test_frechet_distance_matches_the_textbook_formula():
    from scipy import linalg

    gen = torch.Generator().manual_seed(0)
    a = _gaussian(300, 6, 0.3, gen=gen) @ torch.randn(6, 6, generator=gen, dtype=torch.float64)
    b = _gaussian(400, 6, 0.0, gen=gen)
    ref = st.FrechetReference.from_moments(b.mean(0), torch.cov(b.T))
    ca, cb = torch.cov(a.T).numpy(), torch.cov(b.T).numpy()
    expected = (((a.mean(0) - b.mean(0)) ** 2).sum().item()
                + float(torch.tensor(ca + cb - 2 * linalg.sqrtm(ca @ cb).real).trace()))
    assert float(st.frechet_distance(a, ref)) == pytest.approx(expected, rel=1e-8)


def test_intervals_cover_the_truth_at_about_the_nominal_rate():
    """FID at n = N, CLIP score and diversity: 200 seeded experiments, each a sample of the
    generator and its bootstrap; the truth is E[FID_n] (Monte Carlo), and the means."""
    d, n, groups, reps = 16, 100, 25, 200
    ref = _reference(d)
    truth = float(st.frechet_distance(_gaussian(n, d, 0.25, (4000,)), ref).mean())
    gen = torch.Generator().manual_seed(1)
    covered = {"fid": 0, "clip_score": 0, "diversity": 0}
    percentile = 0
    for r in range(reps):
        scores = _scores(_gaussian(n, d, 0.25, gen=gen),
                         30 + 5 * torch.randn(n, generator=gen, dtype=torch.float64),
                         1 + 0.2 * torch.randn(groups, generator=gen, dtype=torch.float64))
        intervals, replicates, _ = st.bootstrap(scores, ref, n,
                                                st.BootstrapPlan(n, groups, n, seed=r))
        for key, true in (("fid", truth), ("clip_score", 30.0), ("diversity", 1.0)):
            covered[key] += intervals[key].low <= true <= intervals[key].high
        q = torch.quantile(replicates["fid"], torch.tensor([0.025, 0.975], dtype=torch.float64))
        percentile += float(q[0]) <= truth <= float(q[1])
    rates = {k: v / reps for k, v in covered.items()}
    print(f"\ncoverage of 95 % intervals over {reps} experiments: {rates}; plain percentile "
          f"interval of FID: {percentile / reps:.2f}")
    assert all(0.9 <= rate <= 0.99 for rate in rates.values()), rates
    # the bias correction is what makes FID's interval cover: resamples add their own bias
    assert percentile / reps < 0.5


def test_fid_below_n_averages_subsets_and_covers_the_expected_fid_at_that_n():
    d, num, n, reps = 8, 200, 80, 80
    ref = _reference(d)
    truth_n = float(st.frechet_distance(_gaussian(n, d, 0.35, (4000,)), ref).mean())
    truth_num = float(st.frechet_distance(_gaussian(num, d, 0.35, (4000,)), ref).mean())
    gen = torch.Generator().manual_seed(2)
    estimates, covered = [], 0
    for r in range(reps):
        x = _gaussian(num, d, 0.35, gen=gen)
        iv, _ = st.fid_interval(x, ref, n, st.BootstrapPlan(num, 0, n, seed=r))
        estimates.append(iv.estimate)
        covered += iv.low <= truth_n <= iv.high
    mean = sum(estimates) / reps
    print(f"\nE[FID_{n}] {truth_n:.3f}, E[FID_{num}] {truth_num:.3f}; subset-mean estimate "
          f"{mean:.3f}, coverage {covered / reps:.2f}")
    assert mean == pytest.approx(truth_n, rel=0.05)
    assert abs(mean - truth_num) > 5 * abs(mean - truth_n)  # it estimates FID at n, not at N
    assert covered / reps >= 0.85


def _pair(shift_b: float, noise_b: float, seed: int = 0, d: int = 8):
    gen = torch.Generator().manual_seed(seed)
    n, groups = 120, 30
    feats = _gaussian(n, d, 0.3, gen=gen)
    clip = 30 + 5 * torch.randn(n, generator=gen, dtype=torch.float64)
    div = 1 + 0.2 * torch.randn(groups, generator=gen, dtype=torch.float64)
    a = _scores(feats, clip, div)
    b = _scores(feats + shift_b + noise_b * torch.randn(n, d, generator=gen, dtype=torch.float64),
                clip - 10 * shift_b + noise_b * torch.randn(n, generator=gen, dtype=torch.float64),
                div + shift_b + noise_b * torch.randn(groups, generator=gen, dtype=torch.float64))
    return a, b, n, groups


def _difference(a, b, n, groups, paired: bool) -> dict[str, st.Interval]:
    ref = _reference(a.features.shape[1])
    ia, ra, plan = st.bootstrap(a, ref, n, st.BootstrapPlan(n, groups, n, seed=0))
    ib, rb, _ = st.bootstrap(b, ref, n, plan if paired else st.BootstrapPlan(n, groups, n, seed=1))
    return st.paired_differences({k: v.estimate for k, v in ia.items()}, ra,
                                 {k: v.estimate for k, v in ib.items()}, rb)


def test_paired_interval_is_narrower_than_unpaired_for_correlated_mixtures():
    a, b, n, groups = _pair(shift_b=0.05, noise_b=0.1)
    paired, unpaired = (_difference(a, b, n, groups, p) for p in (True, False))
    for key in st.METRICS:
        print(f"\n{key}: paired {paired[key].text()}, unpaired {unpaired[key].text()}")
        assert paired[key].half_width < unpaired[key].half_width / 3, key


def test_identical_mixtures_do_not_differ_and_a_clearly_better_one_does():
    a, _, n, groups = _pair(0.0, 0.0)
    same = _difference(a, a, n, groups, paired=True)
    assert all(iv.low <= 0 <= iv.high and not iv.significant for iv in same.values())
    a, b, n, groups = _pair(shift_b=0.3, noise_b=0.05)
    diff = _difference(b, a, n, groups, paired=True)  # b: farther from the reference
    assert diff["fid"].significant and diff["fid"].low > 0
    assert diff["clip_score"].significant and diff["clip_score"].high < 0
    assert diff["diversity"].significant


# ------------------------------------------------------------------ the Judge and the tables


class _Identity(torch.nn.Module):
    """Features = the flattened image (a stand-in extractor with the attributes one has)."""

    name = "identity"
    num_features = 4

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return images.flatten(1)


class _Held(types.SimpleNamespace):
    def __len__(self) -> int:
        return int(self.images.shape[0])


def _judge(heldout: int) -> Judge:
    """A Judge over a held-out set of ``heldout`` 2x2 'images', without a campaign on disk."""
    judge = Judge.__new__(Judge)
    gen = torch.Generator().manual_seed(3)
    judge.heldout = _Held(images=torch.randn(heldout, 1, 2, 2, generator=gen))
    judge.extractor, judge.device = _Identity(), torch.device("cpu")
    judge.frechet = _reference(4)
    judge._floor, judge._heldout_features, judge._clip_real = {}, None, 60.0
    return judge


def test_fid_and_its_floor_are_taken_at_the_same_n():
    gen = torch.Generator().manual_seed(4)
    for num_heldout, num in ((60, 150), (150, 60)):
        judge = _judge(num_heldout)
        feats = torch.randn(num, 4, generator=gen, dtype=torch.float64) + 0.5
        scores = _scores(feats, torch.full((num,), 30.0, dtype=torch.float64),
                         torch.ones(10, dtype=torch.float64))
        metrics, _, plan = judge.summarize(scores)
        n = min(num, num_heldout)
        assert metrics["fid_n"] == plan.n == n
        assert judge._floor and set(judge._floor) == {n}  # the floor was taken at that n only
        assert metrics["fid_floor"] == judge._floor[n].estimate
        assert metrics["fid"] == pytest.approx(st.fid_at_n(feats, judge.frechet, n))
        assert metrics["fid_full_n"] == pytest.approx(float(st.frechet_distance(feats,
                                                                                judge.frechet)))
        assert metrics["fid_low"] < metrics["fid"] < metrics["fid_high"]
        assert metrics["fid_floor_low"] < metrics["fid_floor"] < metrics["fid_floor_high"]
        assert metrics["evaluation_version"] == EVALUATION_VERSION
    with pytest.raises(ValueError, match="held-out"):
        from hdd_ray.evaluation import fid_floor

        fid_floor(torch.zeros(5, 1, 2, 2), torch.randn(50, 1, 2, 2), _Identity(), num_samples=6)


def _saved_mixture(root, judge: Judge, name: str, ddpm: int, scores: st.SampleScores) -> dict:
    from hdd_ray import storage

    metrics, replicates, plan = judge.summarize(scores)
    row = {"mixture_id": name, "assignment": "D F" if ddpm else "F F", "num_ddpm": ddpm,
           "routing": "topk", "k": 2, "guidance": 1.0, "steps": 8, "seed": 0,
           "num_samples": scores.num_samples, **metrics}
    storage.write_bytes(str(root / name / SAMPLES_FILE), scores.to_bytes(replicates, plan))
    return row


def test_comparison_table_has_intervals_and_a_paired_difference_line(tmp_path):
    judge = _judge(200)
    a, b, _, _ = _pair(shift_b=0.3, noise_b=0.05, d=4)
    rows = [_saved_mixture(tmp_path, judge, "hetero", 1, b),
            _saved_mixture(tmp_path, judge, "base", 0, a)]
    md = comparison_table(rows, str(tmp_path))
    print("\n" + md)
    table_row = md.splitlines()[2]
    assert table_row.count("±") == 4  # fid, fid_floor, clip_score, diversity
    assert "paired difference D F minus F F (same prompts and noise, FID at n=120)" in md
    assert "FID +" in md and "(significant)" in md
    assert (tmp_path / "comparison.md").read_text().strip() == md
    header = (tmp_path / "comparison.csv").read_text().splitlines()[0].split(",")
    assert {"fid_low", "fid_high", "fid_floor_low", "clip_score_high", "fid_n"} <= set(header)
    assert "±" in summary(rows[0]) and "n = 120" in summary(rows[0])
    # the same mixture twice: a difference of exactly zero, not significant
    same = comparison_table([rows[1], {**rows[1], "num_ddpm": 1, "assignment": "D F"}],
                            str(tmp_path))
    assert "FID +0.000 ± 0.000 (not significant)" in same
    # another prompt list does not pair
    other = st.SampleScores(a.features, a.clip, a.group_diversity, st.prompts_hash(["x"]),
                            a.diversity_metric)
    rows[1] = _saved_mixture(tmp_path, judge, "base", 0, other)
    assert "not paired" in comparison_table(rows, str(tmp_path))


def test_sweep_ranking_says_which_trials_are_indistinguishable_from_the_best(tmp_path):
    from hdd_ray import storage
    from hdd_ray.sweep.ranking import _compare_with_best, ranking_markdown

    judge = _judge(200)
    a, b, _, _ = _pair(shift_b=0.3, noise_b=0.05, d=4)
    near = _pair(0.0, 0.0, seed=5, d=4)[0]  # another sample of the same generator
    rows = []
    for name, scores, early in (("best", a, False), ("near", near, False), ("far", b, False),
                                ("early", b, True)):
        saved = _saved_mixture(tmp_path, judge, name, 1, scores)
        storage.write_json(str(tmp_path / name / "metrics.json"), saved)
        rows.append({"mixture_id": name, "assignment": name, "fid": saved["fid"],
                     "stopped_early": early, "num_samples": scores.num_samples})
    _compare_with_best(rows, str(tmp_path))
    md = ranking_markdown(rows)
    print("\n" + md)
    tied = {r["mixture_id"]: r["tied_with_best"] for r in rows}
    assert tied == {"best": "best", "near": "yes", "far": "no", "early": ""}
    assert rows[1]["fid_vs_best"].startswith("+") and "±" in rows[1]["fid_vs_best"]
    assert md.splitlines()[2].count("±") == 4 and "tied_with_best" in md

"""Ray Tune sweeps of objective assignments (which clusters use ``ddpm_eps``), routing and CFG.

The search space comes from the config's ``sweep`` section (:class:`hdd_ray.config.SweepConfig`).
The flow of :func:`run_sweep`:

1. **Experts first.** The union of the experts the whole search space can ask for is trained up
   front by one :func:`hdd_ray.training.train_campaign` call per DDPM schedule: for
   each cluster, ``ddpm_eps`` if some candidate assignment makes it DDPM and ``fm_velocity`` if
   some makes it FM, so at most 2K trainings (per schedule) for 2^K mixtures, and an expert is
   never trained twice at once (trials only read the expert cache).
2. **Trials.** A trial is a plain function (Train V2: a trial never wraps a trainer object): it
   assembles its mixture from the cache and evaluates it with
   :func:`~hdd_ray.evaluation.mixture.evaluate_mixture` at each ASHA rung's sample count
   (``sweep.asha.sample_counts``, then ``evaluation.num_samples``), reporting ``fid``,
   ``clip_score``, ``diversity`` and ``num_samples`` to Tune; ASHA stops bad trials on the
   smaller counts. Rungs already evaluated (``mixtures/<id>/metrics.json``) are reused, so a
   restarted trial costs little.
3. **MLflow.** One sweep run; one child run per trial (params: assignment ``D F F D``, number
   of DDPM experts, schedule, routing, k, guidance, steps; tag ``trial_id``; the rungs as steps
   of its metrics; the final sample grid). At the end a ranked table (CSV + markdown) and a
   plot of FID and CLIP score against the number of DDPM experts, as artifacts of the sweep run.
4. **Resume.** The Tune experiment lives in ``<root>/sweeps/<name>``; when it exists,
   ``Tuner.restore`` finishes the remaining trials without redoing finished ones.
5. The best mixture is saved as ``<root>/sweeps/<name>/best_mixture.json``;
   :func:`load_mixture_spec` reads it back (``evaluation/evaluate_mixture.py --mixture NAME``).
6. With ``sweep.register_as: NAME`` the best mixture is exported to ``<root>/sweeps/<name>/
   mixture``, registered as a version of ``NAME`` in MLflow's Model Registry, and the alias
   ``champion`` moves to it when its FID is lower under the same evaluation settings
   (:func:`hdd_ray.sharing.register_best`).

The package: :mod:`~hdd_ray.sweep.space` (the search space and what defines a sweep),
:mod:`~hdd_ray.sweep.trial` (one trial), :mod:`~hdd_ray.sweep.driver` (:func:`run_sweep`),
:mod:`~hdd_ray.sweep.ranking` (the ranked table and plot), :mod:`~hdd_ray.sweep.best`
(``best_mixture.json``).
"""

from hdd_ray.sweep.best import load_mixture_spec
from hdd_ray.sweep.driver import SweepResult, run_sweep, train_needed_experts
from hdd_ray.sweep.ranking import rank
from hdd_ray.sweep.space import candidate_assignments, describe, needed_assignments, param_space
from hdd_ray.sweep.trial import sweep_trial

__all__ = [
    "SweepResult",
    "candidate_assignments",
    "describe",
    "load_mixture_spec",
    "needed_assignments",
    "param_space",
    "rank",
    "run_sweep",
    "sweep_trial",
    "train_needed_experts",
]

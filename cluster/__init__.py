"""Cluster jobs: ``tessera submit STAGE`` renders any stage for Slurm, Ray Jobs or Kubernetes, records it under
``~/.tessera/jobs`` (or ``cluster.state_dir``), and ``tessera jobs`` follows, retries and cancels it.

* ``config``   -- ``ClusterConfig``: resources, retry budgets, the process group, plain env, secret names, one
                  section per backend; ``configs/cluster/<backend>.yaml`` are the defaults.
* ``stages``   -- what a stage needs on a cluster (rank layout, progress probe) and its resolved, staged config.
* ``spec``     -- ``JobSpec``: one backend-independent description of a submitted job.
* ``secrets``  -- secrets travel by name only; the submit environment is scrubbed; canary checks.
* ``records``  -- the JSON job record and its store (works without Slurm accounting).
* ``backend``  -- the backend interface and registry; ``slurm``, ``ray_jobs`` and ``k8s`` implement it.
* ``submit``, ``jobs``, ``cli`` -- the two commands; ``api`` -- the same from Python:

    from tessera.cluster import submit
    job = submit("train", config="configs/train/tiny_dit.yaml", backend="slurm")
    job.wait(); print(job.status(), job.logs())
"""

# The module ``tessera.cluster.submit`` is loaded first, so that the package attribute ``submit`` set below stays
# the function (a submodule imported later would rebind it; one already loaded does not). Import the module's
# names with ``from tessera.cluster.submit import ...``.
from tessera.cluster import submit as _submit_module  # noqa: F401
from tessera.cluster.api import Job, submit

__all__ = ["Job", "submit"]

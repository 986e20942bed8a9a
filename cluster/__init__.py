"""Cluster jobs: ``tessera submit STAGE`` renders any stage for Slurm, Ray Jobs or Kubernetes, records it under
``~/.tessera/jobs`` (or ``cluster.state_dir``), and ``tessera jobs`` follows, retries and cancels it.

* ``config``   -- ``ClusterConfig``: resources, retry budgets, plain env, secret names, one section per backend.
* ``stages``   -- what a stage needs on a cluster (rank layout, progress probe) and its resolved, staged config.
* ``spec``     -- ``JobSpec``: one backend-independent description of a submitted job.
* ``secrets``  -- secrets travel by name only; the submit environment is scrubbed; canary checks.
* ``records``  -- the JSON job record and its store (works without Slurm accounting).
* ``backend``  -- the backend interface and registry; ``slurm``, ``ray_jobs`` and ``k8s`` implement it.
* ``submit``, ``jobs``, ``cli`` -- the two commands.
"""

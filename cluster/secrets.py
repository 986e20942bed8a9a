"""Secrets travel by name only.

A job reads ``WANDB_API_KEY`` and the AWS keys on the cluster (the 0600 secrets file, the cluster's own
environment, or a Kubernetes Secret); no value ever enters a job script, a dry-run print, a Ray
``runtime_env``, a manifest, a staged config or a job record. ``check_clean`` is the last gate before anything
is printed, written or submitted: it refuses an artefact that contains the value of any secret-looking
variable of this process's environment, naming the variable and never the value.
"""

from __future__ import annotations

import os
import re
from typing import Mapping

from tessera.config import ConfigError

# WANDB_API_KEY, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ACCESS_KEY_ID, HF_TOKEN, RAY_AUTH_TOKEN, ...
# (TOKENIZERS_PARALLELISM is not one: a secret word must stand between underscores or the name's ends).
_SECRET_NAME_RE = re.compile(
    r"(^|_)(API_?KEY|SECRET|SECRETS|TOKEN|PASSWORD|PASSWD|CREDENTIALS?|ACCESS_KEY|ACCESS_KEY_ID|PRIVATE_KEY)(_|$)",
    re.I)
# Shorter values ("1", "true") would match everywhere and are no secrets anyway.
_MIN_SECRET_LEN = 8
# Set by a surrounding allocation (salloc, another job): inherited by sbatch they would change the new job.
_SCHEDULER_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
_KEEP = ("SLURM_CONF",)


class SecretLeakError(ConfigError):
    """An artefact would carry a secret value (CLI exit code 2; the message names the variable, not the value)."""


def is_secret_name(name: str) -> bool:
    """True for variable names that hold credentials (API keys, tokens, passwords, access keys)."""
    return bool(_SECRET_NAME_RE.search(name))


def secret_values(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """``{name: value}`` of the secret-looking variables set in ``env`` (default: this process's)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if is_secret_name(k) and len(v) >= _MIN_SECRET_LEN}


def leaked_names(text: str, env: Mapping[str, str] | None = None) -> list[str]:
    """Names of the secret variables whose values occur in ``text``."""
    return sorted(k for k, v in secret_values(env).items() if v in text)


def check_clean(artefacts: Mapping[str, str], env: Mapping[str, str] | None = None) -> None:
    """Raise ``SecretLeakError`` when any artefact (name -> text) contains a secret value."""
    for name, text in artefacts.items():
        leaked = leaked_names(text, env)
        if leaked:
            raise SecretLeakError(
                f"{name} would contain the value of {', '.join(leaked)}: pass secrets by name (cluster.secrets) "
                "and provide them on the cluster, never in configs, overrides or cluster.env")


def submit_environment(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for the submitting command (sbatch exports it into the job): no secrets, and none of
    the surrounding allocation's ``SLURM_*``/``SBATCH_*`` variables (``SLURM_CONF`` is kept)."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items()
            if not is_secret_name(k) and (k in _KEEP or not k.startswith(_SCHEDULER_PREFIXES))}

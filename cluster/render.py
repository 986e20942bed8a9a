"""Jinja2 templates under ``cluster/templates/``: strict (an unknown variable is an error), no HTML escaping.

Jinja's comment marker ``{#`` is also bash's ``${#array[@]}``, so comments use ``<#-- --#>`` here.
"""

from __future__ import annotations

import functools
import importlib.resources

import jinja2


@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    loader = jinja2.FunctionLoader(
        lambda name: importlib.resources.files("tessera.cluster").joinpath("templates", name).read_text("utf-8"))
    return jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, autoescape=False,
                              keep_trailing_newline=True, comment_start_string="<#--", comment_end_string="--#>")


def render_template(name: str, **values) -> str:
    """Render ``templates/<name>`` with ``values``."""
    return _environment().get_template(name).render(**values)

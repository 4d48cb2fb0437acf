"""Shared pytest set-up: the `slow` mark for tests that start other processes or run whole recipes.

Markers (declared in pyproject.toml): `slow` = the real SmolLM2, torchrun runs, fresh-process reloads, recipe runs;
`gpu` = needs CUDA. Most slow tests carry `@pytest.mark.slow` where they are defined; the ones listed in SLOW below
are marked here, by name, so that the list of what the mark covers is in one place. A name listed here that no longer
exists in a collected file is reported as a warning, so the list cannot silently go stale.
"""

from __future__ import annotations

import warnings

import pytest

# file -> test functions (all their parameters) that are slow for the reason given
SLOW: dict[str, dict[str, str]] = {
    "test_callback.py": {
        "test_ddp_two_ranks_stay_identical": "torchrun, 2 processes",
    },
    "test_recipes.py": {
        "test_iterabre_removes_a_layer_per_stage_with_recovery_between": "recipe run",
        "test_shortgpt_removes_layers_in_one_shot_then_recovers": "recipe run",
        "test_dynamic_slicing_slices_and_recovers_with_lora": "recipe run",
        "test_pip_prunes_heads_and_channels_in_steps_and_saves_the_composed_plan": "recipe run",
        "test_llm_surgeon_prunes_in_shots_with_or_without_recovery": "recipe run",
        "test_llm_surgeon_two_four_with_recovery_keeps_the_pattern_exact": "recipe run",
        "test_llm_surgeon_recovery_under_torchrun_two_ranks": "recipe run under torchrun, 2 processes",
    },
    "test_surgery.py": {
        "test_reload_with_hf_prune": "fresh-process reload",
        "test_reload_without_hf_prune": "fresh-process reload",
        "test_compacted_models_reload_without_hf_prune": "fresh-process reload",
    },
    "test_slicing.py": {
        "test_trust_remote_code_loads_constant_and_dynamic_slices_without_hf_prune": "fresh-process reload",
    },
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        name = getattr(item, "originalname", item.name)
        names = seen.setdefault(item.path.name, set())
        names.add(name)
        if name in SLOW.get(item.path.name, {}):
            item.add_marker(pytest.mark.slow)
    if any("::" in arg for arg in config.args):  # single tests asked for by id: the files are not whole
        return
    for file, tests in SLOW.items():
        if file in seen:
            for gone in sorted(set(tests) - seen[file]):
                warnings.warn(pytest.PytestWarning(f"tests/conftest.py SLOW lists {file}::{gone}, which no longer "
                                                   "exists; update the list"))

"""Fixtures of the flow-family tests: the tiny pipelines of ``flow_helpers.FLOW_PIPELINES``, built once per session."""

from __future__ import annotations

import pytest
from flow_helpers import FLOW_PIPELINES


@pytest.fixture(scope="session")
def flow_pipeline_dirs(tmp_path_factory):
    """``{id: folder}`` of every tiny flow pipeline (a few seconds to build them all)."""
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {key: builder(root / key, **kwargs) for key, (builder, kwargs) in FLOW_PIPELINES.items()}


@pytest.fixture(params=sorted(FLOW_PIPELINES))
def flow_dir(request, flow_pipeline_dirs):
    """One tiny flow pipeline folder per test instance (parametrised over ``FLOW_PIPELINES``)."""
    return flow_pipeline_dirs[request.param]

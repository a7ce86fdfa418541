"""Shared fixtures: a small sample dataset, and the local Kubernetes cluster (real control
plane, local kubelet, the chart's CRDs and RBAC), each made once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from instseg_trainer.sample_data import write_sample_dataset
from tests.cluster import KubeEnvironment, start_cluster


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small deterministic COCO root with subsets train (12 images) and val (6)."""
    root = tmp_path_factory.mktemp("sample")
    write_sample_dataset(root, num_train=12, num_val=6, seed=3)
    return root


@pytest.fixture
def dataset_copy(sample_root: Path, tmp_path: Path) -> Path:
    """A private copy of the sample dataset that a test may damage."""
    target = tmp_path / "data"
    shutil.copytree(sample_root, target)
    return target


@pytest.fixture(scope="session")
def kube(tmp_path_factory: pytest.TempPathFactory):
    """One local cluster for the session's tests; each test keeps to its own namespace."""
    environment: KubeEnvironment = start_cluster(tmp_path_factory.mktemp("kube"))
    try:
        yield environment
    finally:
        environment.stop()

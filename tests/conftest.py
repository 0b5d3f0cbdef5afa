"""Shared fixtures: tiny configs and generated data, so tests need nothing outside the repo."""

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny generated MVTec-layout dataset: ROOT/synthetic/{train,test,ground_truth}, 32 px."""
    from anoddpm.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, "synthetic", size=32, n_train=12, n_test_good=4, n_test_defect=8, seed=0)
    return root

"""Shared fixtures: tiny configs and generated data, so tests need nothing outside the repo."""

import pytest  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test: on the shared 2-core CI box two threads per test fight each other
    and run ~20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A tiny generated MVTec-layout dataset: ROOT/synthetic/{train,test,ground_truth}, 32 px."""
    from anoddpm.data.synth import make_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    make_synthetic_dataset(root, "synthetic", size=32, n_train=12, n_test_good=4, n_test_defect=8, seed=0)
    return root

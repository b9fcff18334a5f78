"""The TrainConfig of the tests' tiny synthetic runs: one base, each test file overriding what it needs."""
from drople_fast.training.trainer import TrainConfig


def tiny_run_config(root, out, **overrides) -> TrainConfig:
    """A base-to-novel run on the synthetic dataset at ``root``, written to ``out``: batch 2, one thread,
    no progress bar, its few-shot cache beside the run."""
    base = dict(dataset="Synthetic", root=root, protocol="base2novel", shots=2, seed=1, epochs=1, batch_size=2,
                lr=5e-3, output_dir=str(out), progress=False, num_threads=1, fewshot_cache=str(out) + "-cache")
    base.update(overrides)
    return TrainConfig(**base)

import pytest
import torch

import detrkit
from detrkit.inference.export import example_inputs
from detrkit.training.config import TrainConfig

torch.set_num_threads(2)


# The model of the training tests (DetrConfig fields; classes come from the data).
TINY_MODEL = dict(
    backbone="resnet18",
    d_model=32,
    nheads=4,
    enc_layers=1,
    dec_layers=2,
    dim_feedforward=64,
    num_queries=6,
    dropout=0.0,
)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """The training tests' synthetic data: 8 small training and 4 validation images, one set per
    test module (a module may override it, as test_cuda.py does with more images)."""
    from detrkit.data import SynthConfig, write_synthetic

    root = tmp_path_factory.mktemp("tinydata")
    return write_synthetic(
        root, SynthConfig(images=8, seed=1, min_size=64, max_size=96), {"train": 8, "val": 4}
    )


def tiny(tmp_path, data_root, **kw):
    """A TrainConfig of TINY_MODEL on ``data_root``, writing to ``tmp_path / "run"``."""
    base = dict(
        data=str(data_root),
        output_dir=str(tmp_path / "run"),
        model=TINY_MODEL,
        image_scale=0.12,
        epochs=2,
        batch_size=4,
        num_workers=0,
        eval_every=1,
        seed=0,
    )
    base.update(kw)
    return TrainConfig(**base)


def tiny_config(**overrides) -> detrkit.DetrConfig:
    """A model small enough for CPU tests, with every architectural feature still present."""
    base = dict(
        backbone="resnet18",
        d_model=64,
        nheads=8,
        enc_layers=2,
        dec_layers=3,
        dim_feedforward=96,
        num_queries=7,
        num_classes=4,
        dropout=0.0,
    )
    base.update(overrides)
    return detrkit.DetrConfig(**base)


def shapes_config(**overrides) -> detrkit.DetrConfig:
    """`tiny_config` with the synthetic dataset's classes, at the scale of its ~150 px images."""
    base = dict(
        class_names=("rectangle", "ellipse", "triangle", "diamond"),
        category_ids=(1, 2, 4, 7),
        extra={"image_scale": 0.15},
    )
    base.update(overrides)
    return tiny_config(**base)


def randomize_buffers(model: torch.nn.Module, seed: int = 0) -> None:
    """Frozen BatchNorm buffers start as identity; make them random so parity tests see them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)
            elif name.endswith(("running_mean", "bias")) and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)
            elif name.endswith("weight") and buf.is_floating_point():
                buf.copy_(torch.rand(buf.shape, generator=g) + 0.5)


def padded_batch(sizes=((96, 128), (80, 96)), seed: int = 0):
    """Two images of different sizes, padded bottom/right; returns (images, padding_mask)."""
    return example_inputs(sizes, seed)


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config()).eval()
    randomize_buffers(model)
    return model


def require(module: str):
    """Import a declared test dependency (transformers, timm, ...). Where it is missing, the test that
    needs it fails, never skips: a skip would silently shrink the suite."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module} is a test dependency (pip install -e '.[test]'): {e}", pytrace=False)


def fit_batch(model: torch.nn.Module, batch, steps: int, *, clip: float | None = None) -> dict:
    """Train ``model`` on one batch (AdamW, lr 1e-3) for ``steps`` steps, so that it learns those
    images; returns the last step's losses. The model is left in eval mode."""
    criterion = detrkit.build_criterion(model.config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        losses = criterion(model(batch.images, batch.padding_mask), batch.targets)
        loss = sum(losses[k] * w for k, w in criterion.weight_dict.items() if k in losses)
        optimizer.zero_grad()
        loss.backward()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
    model.eval()
    return losses

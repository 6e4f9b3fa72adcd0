"""The same numbers on a CUDA device as on the CPU: model, matcher and losses, post-processing,
mixed-precision training and checkpoints that move between devices.

These run only where CUDA is available (CI has no GPU); run them on a GPU machine with
``pytest tests/test_cuda.py``. TF32 is switched off so that fp32 results compare at 1e-4.
"""

import copy

import pytest
import torch
from PIL import Image

import detrkit
from conftest import padded_batch, randomize_buffers, tiny, tiny_config
from detrkit.data import SynthConfig, write_synthetic
from detrkit.models.criterion import build_criterion
from detrkit.models.postprocess import PostProcess, PostProcessSegm
from detrkit.training.run_dir import BEST
from detrkit.training.trainer import Trainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def exact_fp32():
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _targets():
    g = torch.Generator().manual_seed(3)
    out = []
    for n in (3, 1):
        centers = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        sizes = torch.rand(n, 2, generator=g) * 0.3 + 0.1
        out.append(
            {
                "labels": torch.randint(0, 4, (n,), generator=g),
                "boxes": torch.cat([centers, sizes], 1),
            }
        )
    return out


@pytest.mark.parametrize("masks", [False, True])
def test_forward_and_losses_match_the_cpu(masks):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(masks=masks)).eval()
    randomize_buffers(model)
    criterion = build_criterion(model.config)
    images, mask = padded_batch()
    targets = _targets()
    if masks:
        for t in targets:
            t["masks"] = (
                torch.rand(len(t["labels"]), *images.shape[-2:], generator=torch.Generator().manual_seed(1))
                > 0.5
            )
    with torch.no_grad():
        ref = model(images, mask)
        ref_losses = criterion(ref, targets)
        model.cuda(), criterion.cuda()  # the criterion's class weights are a buffer
        out = model(images.cuda(), mask.cuda())
        losses = criterion(out, [{k: v.cuda() for k, v in t.items()} for t in targets])
    for key in ("pred_logits", "pred_boxes") + (("pred_masks",) if masks else ()):
        torch.testing.assert_close(out[key].cpu(), ref[key], rtol=1e-4, atol=1e-4, msg=key)
    assert set(losses) == set(ref_losses)
    for key, value in ref_losses.items():
        torch.testing.assert_close(losses[key].cpu(), value, rtol=1e-4, atol=1e-4, msg=key)
    # The post-processors give the same detections (and masks) on either device.
    sizes = torch.tensor([[96, 128], [80, 96]])
    ref_post, post = PostProcess()(ref, sizes), PostProcess()(out, sizes.cuda())
    if masks:
        ref_post = PostProcessSegm()(ref_post, ref, sizes, sizes)
        post = PostProcessSegm()(post, out, sizes.cuda(), sizes.cuda())
    for a, b in zip(ref_post, post):
        for key in a:
            if a[key].dtype == torch.bool:
                assert (a[key] != b[key].cpu()).float().mean() < 1e-3, key
            else:
                torch.testing.assert_close(b[key].cpu(), a[key], rtol=1e-4, atol=1e-4, msg=key)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cudadata")
    return write_synthetic(
        root, SynthConfig(images=16, seed=1, min_size=64, max_size=96), {"train": 16, "val": 4}
    )


@pytest.mark.parametrize("amp,groups,denoising", [("none", 1, 0), ("fp16", 1, 3), ("bf16", 4, 3)])
def test_training_on_cuda_saves_a_model_the_cpu_reads(tmp_path, data_root, amp, groups, denoising):
    # 4 epochs of 4 steps: fp16's grad scaler skips steps while it lowers its initial scale.
    config = tiny(
        tmp_path, data_root, epochs=4, num_workers=1, device="cuda", amp=amp, query_groups=groups,
        denoising_groups=denoising, lr_schedule="linear" if denoising else "step",
    )  # fmt: skip
    trainer = Trainer(config)
    assert trainer.device.type == "cuda"
    assert (trainer.scaler is not None) == (amp == "fp16")  # a grad scaler for fp16 only
    before = {k: v.clone() for k, v in trainer.model.state_dict().items() if v.is_floating_point()}
    metrics = trainer.fit()
    # Every trained part moved (a scaler that skipped every step would leave them as they were).
    for name in ("class_embed.weight", "query_embed.weight", "input_proj.weight"):
        assert not torch.equal(trainer.model.state_dict()[name], before[name]), name
    assert 0.0 <= metrics["bbox/AP"] <= 1.0 and torch.isfinite(torch.tensor(metrics["val/loss"]))
    on_cpu = detrkit.load_model(tmp_path / "run" / BEST).eval()
    on_gpu = detrkit.load_model(tmp_path / "run" / BEST).cuda().eval()
    images, mask = padded_batch()
    with torch.no_grad():
        ref, out = on_cpu(images, mask), on_gpu(images.cuda(), mask.cuda())
    torch.testing.assert_close(out["pred_boxes"].cpu(), ref["pred_boxes"], rtol=1e-4, atol=1e-4)
    assert on_cpu.query_embed.weight.shape[0] == 6  # the aid's extra queries stay out of the model
    assert (trainer.aid is not None) == (groups > 1 or denoising > 0)


def test_detector_on_cuda_gives_the_cpu_detections(tmp_path):
    torch.manual_seed(0)
    model = detrkit.build_model(tiny_config(class_names=("a", "b", "c", "d"))).eval()
    randomize_buffers(model)
    images = [Image.new("RGB", (120, 90), (200, 30, 30)), Image.new("RGB", (64, 100), (10, 200, 30))]
    ref = detrkit.Detector(copy.deepcopy(model), device="cpu").predict(images, threshold=0.0)
    out = detrkit.Detector(model, device="cuda").predict(images, threshold=0.0)
    for a, b in zip(ref, out):
        torch.testing.assert_close(b.boxes.cpu(), a.boxes, rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(b.scores.cpu(), a.scores, rtol=1e-4, atol=1e-4)

"""Embedder, preprocessing, loss and export: shapes, norms, weights loading, parity."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from models.backbones import load_efficientnet_lite
from models.embedder import (
    Embedder,
    EmbedderSpec,
    embed_images,
    frozen_baseline,
    load_embedder,
    save_embedder,
)
from models.export import ExportedEmbedder, export_embedder
from models.losses import weighted_info_nce
from models.preprocessing import (
    EMBED_PX,
    BadImage,
    check_box,
    crop_to_box,
    decode_image,
    square_crop_box,
)

TINY = EmbedderSpec(backbone="tiny_cnn", dim=32, hidden=64)


def _jpeg(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (120, 30, 200)).save(buf, format="JPEG")
    return buf.getvalue()


# --------------------------------------------------------------------------- preprocessing
def test_square_crop_keeps_shape_and_stays_inside():
    # a tall box (lamp) in a 200x100 image: square of side 0.8*100*1.16, centred, inside
    left, top, right, bottom = square_crop_box((0.45, 0.1, 0.55, 0.9), 200, 100, margin=0.08)
    assert right - left == bottom - top == round(80 * 1.16)
    assert 0 <= left and right <= 200 and top >= 0
    # near the edge the square shifts instead of shrinking
    left, _, right, _ = square_crop_box((0.0, 0.4, 0.1, 0.6), 200, 100, margin=0.0)
    assert (left, right) == (0, 20)
    assert crop_to_box(Image.new("RGB", (64, 48)), None).size == (64, 48)


@pytest.mark.parametrize("box", [(0.5, 0.1, 0.4, 0.9), (0, 0, 1.2, 1), (0, 0, 0, 1),
                                 (0, 0, float("nan"), 1), (0, 0, 1), "abcd"])
def test_bad_boxes_are_refused(box):
    with pytest.raises(BadImage):
        check_box(box)


def test_decode_limits():
    assert decode_image(_jpeg(40, 30)).size == (40, 30)
    with pytest.raises(BadImage, match="empty"):
        decode_image(b"")
    with pytest.raises(BadImage, match="not a decodable image"):
        decode_image(b"GIF89a not really")
    with pytest.raises(BadImage, match="not a decodable image"):
        decode_image(_jpeg(64, 64)[:200])
    with pytest.raises(BadImage, match="pixels"):
        decode_image(_jpeg(300, 300), max_pixels=200 * 200)
    with pytest.raises(BadImage, match="bytes"):
        decode_image(_jpeg(64, 64), max_bytes=100)


# --------------------------------------------------------------------------- model
def test_embeddings_are_unit_vectors_of_the_spec_dim():
    model = Embedder(TINY).eval()
    out = model(torch.rand(5, 3, EMBED_PX, EMBED_PX))
    assert out.shape == (5, 32)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)


def test_frozen_baseline_trains_nothing_and_is_reproducible():
    a, b = frozen_baseline(), frozen_baseline()
    assert not [n for n, p in a.named_parameters() if p.requires_grad]
    x = torch.rand(2, 3, EMBED_PX, EMBED_PX)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
    tuned = Embedder(EmbedderSpec(tuned_blocks=2))
    trainable = {n.split(".")[0] for n, p in tuned.named_parameters() if p.requires_grad}
    assert trainable == {"tuned", "head"}
    tuned.train()
    assert not tuned.frozen.training  # ImageNet BN statistics stay put


def test_backbone_weights_load_from_a_local_file(tmp_path):
    net = load_efficientnet_lite("efficientnet-lite0", EMBED_PX, pretrained=False)
    torch.nn.init.normal_(net._conv_stem.weight, 0.0, 0.5)
    path = tmp_path / "lite0.pt"
    torch.save(net.state_dict(), path)
    model = Embedder(EmbedderSpec(weights=str(path)))
    assert torch.equal(model.frozen[0].weight, net._conv_stem.weight)
    pretrained = Embedder(EmbedderSpec())
    assert not torch.equal(pretrained.frozen[0].weight, net._conv_stem.weight)
    # Lightning-style checkpoints ({"state_dict": ...}) load too
    torch.save({"state_dict": net.state_dict()}, tmp_path / "ckpt.pt")
    assert torch.equal(Embedder(EmbedderSpec(weights=str(tmp_path / "ckpt.pt")))
                       .frozen[0].weight, net._conv_stem.weight)


def test_bad_weight_files_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError):
        Embedder(EmbedderSpec(weights=str(tmp_path / "absent.pt")))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch weights file"):
        Embedder(EmbedderSpec(weights=str(tmp_path / "junk.pt")))
    lite1 = load_efficientnet_lite("efficientnet-lite1", EMBED_PX, pretrained=False)
    torch.save(lite1.state_dict(), tmp_path / "lite1.pt")
    with pytest.raises(ValueError, match="do not fit"):
        Embedder(EmbedderSpec(weights=str(tmp_path / "lite1.pt")))
    with pytest.raises(ValueError, match="no installed ImageNet weights"):
        Embedder(EmbedderSpec(backbone="efficientnet-lite2"))


def test_save_load_roundtrip(tmp_path):
    model = Embedder(TINY).eval()
    again = load_embedder(save_embedder(model, tmp_path / "e.pt"))
    x = torch.rand(3, 3, EMBED_PX, EMBED_PX)
    with torch.no_grad():
        assert torch.allclose(model(x), again(x), atol=1e-6)
    assert again.spec.backbone == "tiny_cnn" and again.spec.dim == 32


@pytest.mark.parametrize("spec", [TINY, EmbedderSpec(tuned_blocks=2)], ids=["tiny", "lite0"])
def test_export_parity(spec, tmp_path):
    """ONNX (served) and TorchScript outputs agree with eager: cosine >= 0.9999."""
    torch.manual_seed(0)
    model = Embedder(spec).eval()
    out = export_embedder(model, tmp_path / "export")
    x = torch.rand(6, 3, EMBED_PX, EMBED_PX)
    with torch.no_grad():
        eager = model(x)
        script = torch.jit.load(str(out / "embedder.ts"))(x)
    onnx = torch.from_numpy(ExportedEmbedder(out)(x.numpy()))
    for other in (script, onnx):
        assert F.cosine_similarity(eager, other).min().item() >= 0.9999
    with pytest.raises(ValueError, match="expected"):
        ExportedEmbedder(out)(np.zeros((1, 3, 64, 64), np.float32))


def test_embed_images_crops_each_box(tmp_path):
    img = Image.new("RGB", (128, 128), (255, 255, 255))
    img.paste((200, 20, 20), (0, 0, 40, 40))  # red top-left corner
    img.save(tmp_path / "a.png")
    model = Embedder(TINY).eval()
    boxes = np.array([[0, 0, 0.25, 0.25], [0.75, 0.75, 1.0, 1.0], [0, 0, 0.25, 0.25]])
    vecs = embed_images(model, tmp_path, ["a.png"] * 3, boxes)
    assert vecs.shape == (3, 32) and vecs.dtype == np.float32
    assert np.allclose(vecs[0], vecs[2]) and not np.allclose(vecs[0], vecs[1])
    with pytest.raises(FileNotFoundError):
        embed_images(model, tmp_path, ["missing.png"])


# --------------------------------------------------------------------------- loss
def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    p = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    t = 0.5
    # row 0: logits [2, 1.2]; row 1: [0, 1.6]; columns give the p -> q direction
    def ce(logits, i):
        return -logits[i] + math.log(sum(math.exp(v) for v in logits))
    q0, q1 = ce([2.0, 1.2], 0), ce([0.0, 1.6], 1)
    p0, p1 = ce([2.0, 0.0], 0), ce([1.2, 1.6], 1)
    expected = ((q0 + p0) / 2 * 1.0 + (q1 + p1) / 2 * 3.0) / 4.0
    got = weighted_info_nce(q, p, torch.tensor([1.0, 3.0]), temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # same product in the batch: not a negative, so the loss only sees the diagonal
    masked = weighted_info_nce(q, p, torch.ones(2), torch.tensor([7, 7]), temperature=t)
    assert masked.item() == pytest.approx(0.0, abs=1e-6)
    # a hard negative identical to query 0 raises its loss
    hard = weighted_info_nce(q, p, torch.ones(2), hard_negatives=q[:1], temperature=t)
    assert hard.item() > weighted_info_nce(q, p, torch.ones(2), temperature=t).item()


def test_info_nce_rejects_bad_input():
    v = F.normalize(torch.rand(3, 4), dim=1)
    with pytest.raises(ValueError, match="shape"):
        weighted_info_nce(v, v[:2], torch.ones(3))
    with pytest.raises(ValueError, match="weights"):
        weighted_info_nce(v, v, torch.tensor([1.0, -1.0, 1.0]))
    with pytest.raises(ValueError, match="temperature"):
        weighted_info_nce(v, v, torch.ones(3), temperature=0)

"""mIoU from the confusion matrix, checked by hand and against the official Cityscapes evaluator."""

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.labels import class_names, train_id_to_label_id
from pipeline.maths.metrics import ConfusionMatrix, class_argmax, confusion_from_label_id_pngs


def test_iou_by_hand():
    gt = np.array([0, 0, 1, 1, 255, 2])
    pred = np.array([0, 1, 1, 1, 0, 255])
    cm = ConfusionMatrix(3)
    cm.update(pred, gt)
    # class 0: tp 1, fn 1, fp 0 -> 1/2; class 1: tp 2, fp 1 -> 2/3; class 2: tp 0, fn 1 (pred ignore) -> 0
    np.testing.assert_allclose(cm.iou(), [0.5, 2 / 3, 0.0])
    assert cm.miou() == pytest.approx((0.5 + 2 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(3 / 5)


def test_16_class_summary_adds_the_13_class_miou_of_the_same_model():
    # road and sky right (IoU 1); wall predicted as road: wall IoU 0 and road IoU 1/2; pole absent (NaN).
    names = class_names(16)
    road, sky, wall = (names.index(n) for n in ("road", "sky", "wall"))
    cm = ConfusionMatrix(16)
    cm.update(np.array([road, sky, road]), np.array([road, sky, wall]))
    out = cm.summary(names)
    assert out["miou"] == pytest.approx(100 * (0.5 + 1 + 0) / 3)  # road, sky, wall
    assert out["miou_13"] == pytest.approx(100 * (0.5 + 1) / 2)  # wall, fence, pole left out
    assert "miou_13" not in ConfusionMatrix(19).summary(class_names(19))


def test_absent_class_is_nan_and_excluded():
    cm = ConfusionMatrix(3)
    cm.update(np.array([0, 1]), np.array([0, 1]))
    assert np.isnan(cm.iou()[2])
    assert cm.miou() == 1.0


def test_accumulates_over_split_not_per_image():
    a, b = ConfusionMatrix(2), ConfusionMatrix(2)
    a.update(np.array([0, 0]), np.array([0, 1]))
    b.update(np.array([1]), np.array([1]))
    a.merge(b)
    # pooled: class 0 tp1 fp1 -> .5 ; class 1 tp1 fn1 -> .5 (per-image averaging would differ)
    np.testing.assert_allclose(a.iou(), [0.5, 0.5])


def test_bad_ground_truth_value_is_an_error():
    with pytest.raises(ValueError, match="ground-truth value outside"):
        ConfusionMatrix(3).update(np.array([0]), np.array([7]))


def test_equals_official_cityscapes_evaluator(tmp_path, rng):
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    inv = train_id_to_label_id(19)
    preds, gts = [], []
    for i in range(3):
        gt_train = rng.integers(0, 19, size=(16, 24))
        gt_ids = inv[gt_train].astype(np.uint8)
        gt_ids[:2, :] = 0  # unlabeled -> ignored in evaluation
        gt_ids[5, 5] = 4  # 'static', also ignored
        noisy = np.where(rng.random((16, 24)) < 0.3, rng.integers(0, 19, size=(16, 24)), gt_train)
        pred_ids = inv[noisy].astype(np.uint8)
        g, p = (
            tmp_path / f"city_{i:06d}_000019_gtFine_labelIds.png",
            tmp_path / f"city_{i:06d}_000019_pred.png",
        )
        Image.fromarray(gt_ids).save(g)
        Image.fromarray(pred_ids).save(p)
        gts.append(str(g))
        preds.append(str(p))
    args = official.args
    args.quiet = True
    args.evalInstLevelScore = False
    args.JSONOutput = False
    args.exportFile = str(tmp_path / "result.json")
    result = official.evaluateImgLists(preds, gts, args)
    official_miou = result["averageScoreClasses"]
    ours = confusion_from_label_id_pngs(list(zip(preds, gts)))
    assert ours.miou() == pytest.approx(official_miou, abs=1e-9)


def test_class_argmax_is_argmax_with_first_index_on_ties() -> None:
    scores = torch.tensor([[0.1, 0.7, 0.7, 0.2], [0.5, 0.5, 0.1, 0.0]]).T.reshape(1, 4, 2, 1)  # [B, K, h, w]
    assert class_argmax(scores).flatten().tolist() == [1, 0]  # ties: the lower class index
    x = torch.randn(2, 19, 5, 7)
    for t in (x, x.contiguous(memory_format=torch.channels_last)):
        assert torch.equal(class_argmax(t), x.argmax(1))
    assert torch.equal(class_argmax(x[0], 0), x[0].argmax(0))

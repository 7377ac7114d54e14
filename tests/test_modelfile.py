"""pbp_fx.modelfile: reading a metric's direction from its name."""
import pytest

from pbp_fx.modelfile import reads_lower_is_better


@pytest.mark.parametrize("name, lower", [
    ("val_loss", True), ("val/loss", True), ("loss/val", True), ("val.loss", True), ("valLoss", True),
    ("val_logloss", True), ("valMSELoss", True), ("val_bce", True), ("eval_err", True), ("mae", True),
    ("top1_error", True), ("val_dice_loss", True), ("eval_wer", True),
    ("val_acc", False), ("valAcc", False), ("eval_accuracy", False), ("val_f1", False), ("val_auroc", False),
    ("gloss_acc", False), ("val_score", False), ("val_ce_acc", False), ("error_rate", True), ("ce_loss", True),
    ("acc_error", True), ("loss_acc", False), ("mse_score", True), ("val_wer_score", True), ("valMseScore", True),
    ("f1_score", False),
])
def test_a_metrics_name_is_read_by_its_words(name, lower):
    """Split on "_" only, val/loss and valLoss read as accuracies (the Lightning callback then warned that it
    minimises them), and any word ending in "loss" outweighed an accuracy's (gloss_acc; the diff reviews)."""
    assert reads_lower_is_better(name) is lower

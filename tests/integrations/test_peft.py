"""PEFT (LoRA) models through perforate, finalize and ONNX export (tiny random BERT, CPU, offline)."""
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import default_data_collator  # noqa: E402

import pbp_fx  # noqa: E402
from pbp_fx.errors import PBError  # noqa: E402
from synthetic import parity_tokens, tiny_bert  # noqa: E402


def _inputs() -> dict:
    return {k: v for k, v in default_data_collator(parity_tokens(4, 0)).items() if k != "labels"}


def _lora(model):
    return get_peft_model(model, LoraConfig(r=4, task_type="SEQ_CLS", target_modules=["query", "value"]))


@pytest.fixture
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def test_a_lora_classifier_with_a_dendrite_on_its_saved_head_finalizes_and_exports(tmp_path, quiet):
    """PEFT wraps a SEQ_CLS head in ModulesToSaveWrapper, whose __getattr__ raises KeyError for a child gone:
    finalize (and so every export) failed with KeyError 'modules_to_save' once that site had a dendrite."""
    from pbp_fx.exporters import ort_session, run

    kw = _inputs()
    pm = pbp_fx.perforate(_lora(tiny_bert()), example_kwargs=kw)
    assert any("modules_to_save" in name for name in pm.sites)
    pm.grow()
    torch.manual_seed(0)
    with torch.no_grad():
        for site in pm.sites.values():  # (V = 0 at growth: the dendrites must count)
            for p in site.dendrites.parameters():
                p.normal_(0, 0.5)
    pm.eval()
    want = pm(**kw).logits
    torch.testing.assert_close(pm.finalize()(**kw).logits, want, rtol=0, atol=1e-6)
    path = str(tmp_path / "lora.onnx")
    pbp_fx.export_onnx(pm, None, path, example_kwargs=kw)
    got = run(ort_session(path, device="cpu"), {k: v.numpy() for k, v in kw.items()})
    np.testing.assert_allclose(got[0], want.detach().numpy(), atol=1e-4)


def test_lora_put_into_a_perforated_model_is_refused_as_the_graph_never_calls_it(quiet):
    """get_peft_model after perforate swapped lora.Linear in where the captured graph reads query.weight: LoRA
    changed nothing and never trained, with no word."""
    kw = _inputs()
    pm = pbp_fx.perforate(tiny_bert(), example_kwargs=kw)
    assert pm.graph_module.meta["pbp_frontend"] == "export"
    get_peft_model(pm, LoraConfig(r=4, target_modules=["query", "value"]))
    message = (r"pm.graph_module.bert.encoder.layer.0.attention.self.query was a Linear when the model was perforated "
               r"and is now a peft.tuners.lora.layer.Linear: .*would ignore the new module.*before pbp_fx.perforate")
    with pytest.raises(PBError, match=message):
        pbp_fx.PhaseController(pm)
    with pytest.raises(PBError, match=message):
        pm.finalize()


def test_merge_and_unload_through_source_model_is_named_at_the_next_call(quiet):
    kw = _inputs()
    pm = pbp_fx.perforate(_lora(tiny_bert()), example_kwargs=kw)
    pm(**kw)
    pm.source_model.merge_and_unload()
    with pytest.raises(PBError, match=r"query.base_layer was a Linear when the model was perforated and is gone: .*"
                                      r"cannot run"):
        pm(**kw)

"""pbp_fx.signature: a perforated model accepts every call the original accepts."""
import dataclasses

import pytest
import torch
from torch import nn

import pbp_fx
from parts_models import Reshapes
from pbp_fx.signature import CallError, CallSignature

pytestmark = pytest.mark.usefixtures("seeded")


class Optional3(nn.Module):
    """Whisper-like: optional inputs in the middle, a keyword-only scale."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(4, 4)
        self.dec = nn.Linear(4, 4)

    def forward(self, feats, mask=None, ids=None, *, scale=1.0):
        h = self.enc(feats)
        if mask is not None:
            h = h * mask
        if ids is not None:
            h = h + self.dec(ids)
        return h * scale


class KwargsLoss(nn.Module):
    """Takes extra keywords through **kwargs; `divisor` changes the loss, `unused` nothing."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, labels=None, **kwargs):
        logits = self.fc(x)
        if labels is None:
            return logits
        loss = nn.functional.cross_entropy(logits, labels, reduction="sum")
        return loss / kwargs.get("divisor", labels.shape[0])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_positional_none_defaults_and_keyword_only(frontend):
    model = Optional3()
    x, ids = torch.randn(3, 4), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,), example_kwargs={"ids": ids}, frontend=frontend)
    assert sorted(pm.sites) == ["dec", "enc"]
    want = model(x, ids=ids)
    for got in (pm(x, None, ids), pm(x, ids=ids), pm(x, mask=None, ids=ids), pm(x, None, ids, scale=1.0),
                pm(feats=x, ids=ids)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_the_finalized_model_takes_inputs_under_their_own_keywords(frontend):
    model = Optional3()
    x, ids = torch.randn(3, 4), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x,), example_kwargs={"ids": ids}, frontend=frontend)
    final = pm.finalize()
    # (torch.export's graph takes the tensor inputs only: the others are specialised away)
    constants = {"scale": 1.0, "mask": None} if frontend == "fx" else {}
    torch.testing.assert_close(final(x, ids=ids, **constants), model(x, ids=ids), rtol=0, atol=0)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_call_outside_the_traced_pattern_is_one_clear_error(frontend):
    model = Optional3()
    x, ids = torch.randn(3, 4), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x, None, ids), frontend=frontend)
    with pytest.raises(CallError, match=r"traced with mask=None, this call passes Tensor.*perforate with an example "
                                        r"call whose mask is Tensor"):
        pm(x, torch.ones(3, 4), ids)
    traced_with_mask = pbp_fx.perforate(model, (x, torch.ones(3, 4), ids), frontend=frontend)
    with pytest.raises(CallError, match=r"this call passes None.*an example call that leaves mask out, as this one"):
        traced_with_mask(x, None, ids)
    with pytest.raises(CallError, match=r"scale=1.0, this call passes 2.0"):
        pm(x, None, ids, scale=2.0)
    with pytest.raises(TypeError, match="unexpected keyword|got an unexpected"):
        pm(x, None, ids, nonsense=1)  # the original refuses it too
    # (inspect's bare "too many positional arguments" named neither the model nor what it takes)
    with pytest.raises(CallError, match=r"^Optional3.forward\(feats, mask=None, ids=None, \*, scale=1.0\): too many "
                                        r"positional arguments$"):
        pm(x, None, ids, x)
    with pytest.raises(CallError, match=r"^TensorDefault.forward\(feats, scale=2, bias=tensor\(\[\[1., 1., 1., 1.\], "
                                        r"\[1., 1., 1., 1.\]\]\)\): too many positional arguments$"):
        pbp_fx.perforate(TensorDefault(), (x,), frontend=frontend)(x, 2, x, x)
    with pytest.raises(TypeError):
        model(x, None, ids, nonsense=1)


class TensorDefault(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, feats, scale=2, bias=torch.ones(2, 4)):  # (after a default: None stands in the graph)
        return self.fc(feats) * scale + bias.sum()


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_tensor_default_is_taken_and_can_be_given(frontend):
    """fx wrote the default into the graph's signature as a name it never defined: perforate failed with
    'NameError: _tensor_constant0' (a reviewer)."""
    model, x, other = TensorDefault(), torch.randn(3, 4), torch.full((2, 4), 3.0)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    torch.testing.assert_close(pm(x), model(x))
    if frontend == "fx":  # (torch.export specialises a tensor default: another is refused, as other constants)
        torch.testing.assert_close(pm(x, 2, other), model(x, 2, other))
        torch.testing.assert_close(pm(x, bias=other), model(x, bias=other))
    # (the finalized graph takes its tensor inputs as the graph does: the default given)
    final = pm.finalize()
    torch.testing.assert_close(final(x, 2, torch.ones(2, 4)) if frontend == "fx" else final(x, torch.ones(2, 4)),
                               model(x))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_untraced_kwargs_dropped_when_unused_refused_when_used(frontend):
    model = KwargsLoss()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    logits = pbp_fx.perforate(model, (x,), frontend=frontend)
    torch.testing.assert_close(logits(x, unused=torch.tensor(7)), model(x), rtol=0, atol=0)
    torch.testing.assert_close(logits(x, divisor=torch.tensor(2.0)), model(x), rtol=0, atol=0)  # no loss computed
    with_loss = pbp_fx.perforate(model, (x, y), frontend=frontend)
    torch.testing.assert_close(with_loss(x, y, unused=3), model(x, y), rtol=0, atol=0)
    with pytest.raises(CallError, match=r"'divisor' was not given to perforate\(\).*example_kwargs"):
        with_loss(x, y, divisor=torch.tensor(2.0))
    traced = pbp_fx.perforate(model, (x, y), example_kwargs={"divisor": torch.tensor(2.0)}, frontend=frontend)
    torch.testing.assert_close(traced(x, y, divisor=torch.tensor(4.0)), model(x, y, divisor=torch.tensor(4.0)))


class _Tempered(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, **kwargs):
        return self.fc(x) / kwargs.get("temperature", 1.0)


def test_an_untraced_keyword_is_checked_again_for_each_new_value():
    """temperature=1.0 approved the name once, and temperature=2.0 then returned the untempered output (a reviewer)."""
    model, x = _Tempered(), torch.randn(5, 4)
    pm = pbp_fx.perforate(model, (x,))
    torch.testing.assert_close(pm(x, temperature=1.0), model(x), rtol=0, atol=0)
    torch.testing.assert_close(pm(x, temperature=1.0), model(x), rtol=0, atol=0)
    for value in (2.0, torch.tensor(2.0)):
        with pytest.raises(CallError, match=r"'temperature' was not given to perforate\(\) and _Tempered uses it"):
            pm(x, temperature=value)
    torch.testing.assert_close(pm(x, temperature=torch.tensor(1.0)), model(x), rtol=0, atol=0)
    # tensors of several elements by their elements, in containers too, and a copy of what was approved (the
    # diff review: shape and dtype alone, or a repr that torch shortens, let a changed value through)
    ones = torch.ones(3)
    torch.testing.assert_close(pm(x, temperature=ones), model(x), rtol=0, atol=0)
    ones[1] = 2.0  # (changed in place after its approval)
    for value in (ones, torch.full((3,), 2.0), [torch.ones(3), 2.0]):
        with pytest.raises(CallError, match=r"'temperature' was not given to perforate\(\) and _Tempered uses it"):
            pm(x, temperature=value)
    # an object changed in place after its approval is another value (the second diff review)
    options = _Temperature(1.0)
    pm = pbp_fx.perforate(_TemperedBy(), (x,))
    torch.testing.assert_close(pm(x, options=options), _TemperedBy()(x), rtol=0, atol=0)
    options.value = 3.0
    with pytest.raises(CallError, match=r"'options' was not given to perforate\(\) and _TemperedBy uses it"):
        pm(x, options=options)


@dataclasses.dataclass
class _Temperature:
    value: float


class _TemperedBy(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, x, **kwargs):
        options = kwargs.get("options")
        return self.fc(x) / (options.value if options is not None else 1.0)


class _Counted(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.calls = nn.Linear(4, 3), 0

    def forward(self, x, **kwargs):
        self.calls += 1
        return self.fc(x)


def test_an_untraced_keyword_the_output_ignores_is_checked_for_a_few_values_only():
    """A step counter passed along ran the original model twice more at every call (the diff review)."""
    from pbp_fx.perforated import UNTRACED_VALUES_CHECKED

    model, x = _Counted(), torch.randn(5, 4)
    pm = pbp_fx.perforate(model, (x,))
    source = pm.source_model
    before = source.calls
    with pytest.warns(UserWarning, match=r"keyword input 'step', which perforate\(\) did not trace, left _Counted's "
                                         r"output unchanged at 4 values: it is taken as unused from now on"):
        for step in range(20):
            pm(x, step=step)
    assert source.calls - before == 2 * UNTRACED_VALUES_CHECKED  # (with and without the keyword, per value checked)


def test_the_untraced_check_leaves_modes_and_buffers_alone():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    class Wrap(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = model

        def forward(self, x, **kwargs):
            return self.body(x)

    pm = pbp_fx.perforate(Wrap(), (torch.randn(8, 4),))
    pm.train()
    before = {n: b.clone() for n, b in pm.named_buffers()}
    pm.eval()
    pm(torch.randn(8, 4), num_items_in_batch=torch.tensor(8))
    assert not pm.training and all(torch.equal(b, before[n]) for n, b in pm.named_buffers())


def test_call_signature_templates():
    sig = CallSignature.of(Optional3(), (torch.zeros(2, 4),), {"ids": torch.zeros(2, 4)}, "keyword")
    assert sig.constants() == {"mask": None, "scale": 1.0}
    args, kwargs = sig.graph_inputs((torch.ones(1, 4), None, torch.ones(1, 4)), {})
    assert args == () and list(kwargs) == ["feats", "ids"]
    with pytest.raises(ValueError, match="style"):
        CallSignature.of(Optional3(), (torch.zeros(2, 4),), {}, "both")


def test_hf_bert_trainer_keywords():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=32, num_labels=3)
    model = transformers.BertForSequenceClassification(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    labels = torch.tensor([0, 2])
    pm = pbp_fx.perforate(model, example_kwargs={"input_ids": ids, "attention_mask": mask, "labels": labels})
    pm.eval()
    want = model(input_ids=ids, attention_mask=mask, labels=labels)
    # What the Trainer passes: the batch as keywords plus num_items_in_batch (classification
    # losses do not use it, so it is dropped), and positional calls with None in between.
    got = pm(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=torch.tensor(2))
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)
    got = pm(ids, mask, None, None, None, labels)
    torch.testing.assert_close(got.logits, want.logits)


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_onnx_export_takes_the_originals_call(frontend, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model = Optional3().eval()
    x, ids = torch.randn(3, 4), torch.randn(3, 4)
    pm = pbp_fx.perforate(model, (x, None, ids), frontend=frontend)
    pm.grow()
    path = pbp_fx.export_onnx(pm, (x, None, ids), tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: v.numpy() for i, v in zip(sess.get_inputs(), (x, ids))}
    out = sess.run(None, feeds)[0]
    torch.testing.assert_close(torch.from_numpy(out), pm.eval()(x, None, ids), rtol=1e-4, atol=1e-5)


def test_plain_tensor_calls_take_the_fast_path():
    sig = CallSignature.of(Optional3(), (torch.zeros(2, 4),), {}, "keyword")
    assert sig.plain_arity == 1 and sig.is_plain((torch.ones(3, 4),), {})
    assert not sig.is_plain((torch.ones(3, 4), None), {}) and not sig.is_plain((torch.ones(3, 4),), {"scale": 1.0})
    assert CallSignature.of(Optional3(), (torch.zeros(2, 4), None, torch.zeros(2, 4)), {}).plain_arity == -1


class DictInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(3, 2)

    def forward(self, d, extra):
        return self.a(d["x"]) + self.b(d["y"]["p"]) - self.b(d["y"]["q"]) + self.a(extra[0]["w"]) - self.a(extra[0]["v"])


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_a_dict_inputs_keys_may_come_in_any_order_as_the_original_takes_them(frontend, tmp_path):
    """A dict with the traced keys in another order was refused ('traced with d=dict of [Tensor, Tensor],
    this call passes dict of [Tensor, Tensor]'), and so, after save and load, was the trained example itself:
    the checkpoint records the input with its keys sorted (a reviewer)."""
    model = DictInput()
    x, p, q, w, v = torch.randn(3, 4), torch.randn(3, 3), torch.randn(3, 3), torch.randn(3, 4), torch.randn(3, 4)
    expected = model({"x": x, "y": {"p": p, "q": q}}, [{"w": w, "v": v}])
    pm = pbp_fx.perforate(model, ({"y": {"q": q, "p": p}, "x": x}, [{"v": v, "w": w}]), frontend=frontend)
    for d in ({"y": {"q": q, "p": p}, "x": x}, {"x": x, "y": {"p": p, "q": q}}):  # (nested keys in any order too)
        for extra in ([{"v": v, "w": w}], [{"w": w, "v": v}]):
            torch.testing.assert_close(pm(d, extra), expected, rtol=0, atol=0)
    pbp_fx.save(pm, tmp_path / "run.safetensors")
    loaded = pbp_fx.load(tmp_path / "run.safetensors", DictInput)
    torch.testing.assert_close(loaded({"y": {"q": q, "p": p}, "x": x}, [{"v": v, "w": w}]), expected, rtol=0, atol=0)
    with pytest.raises(CallError, match=r"traced with d=\{'y': \{'q': Tensor, 'p': Tensor\}, 'x': Tensor\}, this "
                                        r"call passes \{'x': Tensor, 'z': Tensor\}"):
        pm({"x": x, "z": p}, [{"w": w, "v": v}])


def test_a_torch_size_where_a_tuple_was_traced_is_taken_and_a_refusal_names_types_that_print_alike():
    x = torch.randn(3, 4)
    pm = pbp_fx.perforate(Reshapes(), (x, (3, 2, 3)))
    torch.testing.assert_close(pm(x, torch.Size([3, 2, 3])), pm(x, (3, 2, 3)), rtol=0, atol=0)
    traced_with_a_list = pbp_fx.perforate(Reshapes(), (x, [3, 2, 3]))
    with pytest.raises(CallError, match=r"traced with size=\[3, 2, 3\], this call passes \(3, 2, 3\)"):
        traced_with_a_list(x, (3, 2, 3))

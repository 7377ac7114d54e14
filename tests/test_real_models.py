"""Real-world models: Hugging Face BERT and GPT-2 (torch.export frontend) and a torchvision-style
ResNet-18 (fx), end to end: perforate exactly, grow, finalize, one PB dendrite phase, fused
ONNX export run in ONNX Runtime; train/eval behaviour against the original; tied weights.

Tiny random configurations only: no weights or datasets are downloaded.
"""
import copy
import time

import pytest
import torch
from torch import nn

import pbp_fx
from pbp_fx.exporters import export_onnx, ort_session, run
from pbp_fx.models.resnet18 import ResNet18
from pbp_fx.modes import ModeSwitch
from pbp_fx.site import TiedFusedSite

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning",
                                        "ignore::DeprecationWarning")


def _bert(dropout: float = 0.0):
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                  vocab_size=100, max_position_embeddings=64, hidden_dropout_prob=dropout,
                                  attention_probs_dropout_prob=dropout, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(cfg)


def _gpt2(dropout: float = 0.0):
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, use_cache=False,
                                  bos_token_id=0, eos_token_id=0, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


def _tokens(batch=2, seq=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0  # padding in the first sequence
    return ids, mask


def _resnet():
    torch.manual_seed(0)
    return ResNet18(num_classes=10, width=8)


def _image(batch=2, seed=1):
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# name -> (build, inputs: () -> (args, kwargs), logits of the output, expected frontend, sites by kind)
MODELS = {
    "bert": (_bert, lambda: ((), dict(zip(("input_ids", "attention_mask"), _tokens()))), lambda o: o.logits,
             "export", {"linear": 2 * 6 + 2}),
    "gpt2": (_gpt2, lambda: ((), {"input_ids": _tokens()[0]}), lambda o: o.logits, "export", {"linear": 2 * 4 + 1}),
    "resnet18": (_resnet, lambda: ((_image(),), {}), lambda o: o, "fx", {"conv2d": 20, "linear": 1}),
}


def _kinds(pm) -> dict:
    out: dict = {}
    for s in pm.sites.values():
        out[s.kind] = out.get(s.kind, 0) + 1
    return out


def _randomize(pm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in pm.sites.values():
            s.out_weight.copy_(0.5 * torch.randn(s.out_weight.shape, generator=g))
            s.cascade.copy_(0.5 * torch.randn(s.cascade.shape, generator=g))


@pytest.fixture(scope="module", params=list(MODELS))
def case(request):
    build, inputs, logits, frontend, kinds = MODELS[request.param]
    model = build().eval()
    args, kwargs = inputs()
    t0 = time.perf_counter()
    pm = pbp_fx.perforate(model, args, example_kwargs=kwargs)
    seconds = time.perf_counter() - t0
    return dict(name=request.param, model=model, args=args, kwargs=kwargs, logits=logits, pm=pm.eval(),
                frontend=frontend, kinds=kinds, seconds=seconds)


def test_frontend_and_sites(case):
    pm = case["pm"]
    meta = pm.graph_module.meta
    assert meta["pbp_frontend"] == case["frontend"]
    assert meta["pbp_modes"] == "train+eval"
    if case["frontend"] == "export":
        assert "cannot trace" in meta["pbp_fx_error"]  # why symbolic tracing was not used
    assert _kinds(pm) == case["kinds"]
    assert pm.num_parameters() == sum(p.numel() for p in case["model"].parameters())


def test_exact_at_k0_in_both_modes_and_called_like_the_original(case):
    pm, model, args, kwargs = case["pm"], case["model"], case["args"], case["kwargs"]
    for training in (False, True):
        model.train(training)
        pm.train(training)
        with torch.no_grad():
            torch.manual_seed(3)
            want = model(*args, **kwargs)
            torch.manual_seed(3)
            got = pm(*args, **kwargs)
        assert type(got) is type(want)  # SequenceClassifierOutput, CausalLMOutput..., a tensor
        assert torch.equal(case["logits"](got), case["logits"](want)), f"training={training}"
    model.eval()
    pm.eval()


def test_other_batch_and_sequence_sizes(case):
    pm, model = case["pm"], case["model"]
    if case["name"] == "resnet18":
        args, kwargs = (_image(batch=5, seed=4),), {}
    else:
        ids, mask = _tokens(batch=3, seq=11, seed=4)
        args, kwargs = (), ({"input_ids": ids, "attention_mask": mask} if case["name"] == "bert" else {"input_ids": ids})
    with torch.no_grad():
        assert torch.equal(case["logits"](pm(*args, **kwargs)), case["logits"](model(*args, **kwargs)))


def test_grow_finalize_and_fused_onnx(case, tmp_path):
    pm = copy.deepcopy(case["pm"])
    args, kwargs = case["args"], case["kwargs"]
    with torch.no_grad():
        before = case["logits"](pm(*args, **kwargs))
        pm.grow()
        assert torch.equal(case["logits"](pm(*args, **kwargs)), before)  # V = 0: nothing changes
        _randomize(pm)
        want = case["logits"](pm(*args, **kwargs))
    assert (want - before).abs().max() > 1e-3
    fin = pm.finalize()
    with torch.no_grad():
        got = case["logits"](fin(*args, **kwargs))
    assert (got - want).abs().max() < 1e-5
    # ONNX: inputs positionally in the forward's order (input_ids, attention_mask)
    inputs = tuple(args) + tuple(kwargs.values())
    t0 = time.perf_counter()
    path = export_onnx(pm, inputs, tmp_path / "model.onnx")
    export_s = time.perf_counter() - t0
    out = run(ort_session(path, device="cpu"), tuple(t.numpy() for t in inputs))
    assert abs(out[0] - want.numpy()).max() < 1e-4
    print(f"\n{case['name']}: frontend {pm.graph_module.meta['pbp_frontend']}, sites {_kinds(pm)}, "
          f"perforate {case['seconds']:.2f} s, fused ONNX export {export_s:.2f} s")


def test_one_dendrite_phase_runs(case):
    pm = copy.deepcopy(case["pm"]).train()
    args, kwargs = case["args"], case["kwargs"]
    with torch.no_grad():
        ref = case["logits"](pm.eval()(*args, **kwargs))
    pm.train()
    pm.start_dendrite_phase(pool=2)
    opt = torch.optim.Adam(pm.trainable_parameters(), lr=1e-2)
    for step in range(3):
        out = case["logits"](pm(*args, **kwargs))
        loss = out.float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.install_candidates()
    assert set(pm.num_dendrites.values()) == {1}
    with torch.no_grad():
        assert (case["logits"](pm.eval()(*args, **kwargs)) - ref).abs().max() < 1e-5  # V starts at 0


# -- tied weights ----------------------------------------------------------------------------------

def test_gpt2_lm_head_stays_tied_to_the_embedding():
    pm = pbp_fx.perforate(_gpt2().eval(), example_kwargs={"input_ids": _tokens()[0]}, dynamic=False)
    gm = pm.graph_module
    assert gm.lm_head.weight is gm.transformer.wte.weight
    site = pm.sites["lm_head"]
    assert site.layer.weight_shape == (100, 32)
    c_attn = pm.sites["transformer.h.0.attn.c_attn"]  # Conv1D: addmm with the weight stored [in, out]
    assert c_attn.layer.weight_shape == (96, 32) and c_attn.spec.weight_transposed
    pm.grow()
    _randomize(pm)
    assert gm.lm_head.weight is gm.transformer.wte.weight
    assert isinstance(site.dendrites.weight, nn.Parameter)
    assert all(site.dendrites.weight is not p for p in (gm.lm_head.weight,))  # dendrites: own parameters
    fin = pm.finalize()
    fused = fin.pbp_fused
    tied = [m for m in fused.values() if isinstance(m, TiedFusedSite)]
    assert len(tied) == 1 and tied[0].neuron_weight is fin.transformer.wte.weight
    assert not any(isinstance(m, TiedFusedSite) for k, m in fused.items() if "attn" in k or "mlp" in k)
    ids = _tokens()[0]
    with torch.no_grad():
        assert (fin(input_ids=ids).logits - pm(input_ids=ids).logits).abs().max() < 1e-5
    # one embedding matrix in the finalized model, not two (K = 1 dendrite rows [1 * 100, 32] have its shape too)
    emb = fin.transformer.wte.weight
    assert sum(1 for p in fin.parameters() if p.shape == emb.shape and torch.equal(p, emb)) == 1


def test_a_causal_lm_traced_with_labels_trains_under_bf16_autocast():
    """Trainer(bf16=True) crashed at step 0 on GPT-2, Llama and Qwen2 traced with labels: the graph asserted
    that the logits reaching the loss's `.float()` were float32 (torch.export's dtype check), where autocast
    gives bfloat16 (a reviewer)."""
    ids = _tokens()[0]
    model = _gpt2()
    pm = pbp_fx.perforate(model, example_kwargs={"input_ids": ids, "labels": ids}, frontend="export")
    pm.start_dendrite_phase(pool=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, want = pm(input_ids=ids, labels=ids), model(input_ids=ids, labels=ids)
    # (the graph, captured in float32, hands out the loss's float() copy of the logits: same values)
    assert torch.equal(out.logits.float(), want.logits.float()) and torch.equal(out.loss, want.loss)
    out.loss.backward()
    assert all(int(s.candidates.steps) == 1 for s in pm.sites.values())


# -- train / eval ----------------------------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_batchnorm_and_dropout_follow_the_mode(frontend):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6)
            self.fc = nn.Linear(6, 4)

        def forward(self, x):
            h = torch.relu(self.bn(self.conv(x))).mean((2, 3))
            return self.fc(nn.functional.dropout(h, 0.5, training=self.training))

    torch.manual_seed(0)
    model, x = Net(), torch.randn(4, 3, 8, 8)
    pm = pbp_fx.perforate(model, (x,), frontend=frontend)
    assert pm.graph_module.meta["pbp_frontend"] == frontend
    assert pm.sites["conv"].norm is not None  # BatchNorm joins the conv site in both frontends
    if frontend == "export":  # functional dropout and batch norm became mode switches
        assert sum(isinstance(m, ModeSwitch) for m in pm.modules()) >= 2
    for training in (True, False, True):
        model.train(training)
        pm.train(training)
        torch.manual_seed(5)
        want = model(x)
        torch.manual_seed(5)
        got = pm(x)
        assert torch.allclose(got, want, atol=1e-6), training
    # BN running statistics moved alike in the train-mode calls
    gm = pm.graph_module
    assert torch.allclose(gm.get_buffer("bn.running_mean"), model.bn.running_mean, atol=1e-6)
    assert int(gm.get_buffer("bn.num_batches_tracked")) == int(model.bn.num_batches_tracked) == 2


def test_dropout_statistics_match_the_original_with_p_above_zero():
    model = _bert(dropout=0.3)
    ids, mask = _tokens()
    pm = pbp_fx.perforate(model.eval(), example_kwargs={"input_ids": ids, "attention_mask": mask}, dynamic=False)
    with torch.no_grad():
        pm.eval()
        model.eval()
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits, model(input_ids=ids, attention_mask=mask).logits)
        pm.train()
        model.train()
        samples = {}
        for name, m in (("pm", pm), ("model", model)):
            torch.manual_seed(11 if name == "pm" else 12)  # independent draws
            samples[name] = torch.stack([m(input_ids=ids, attention_mask=mask).logits for _ in range(64)])
    a, b = samples["pm"], samples["model"]
    assert a.std(0).mean() > 1e-3  # dropout is on in train mode
    se = (a.var(0) / 64 + b.var(0) / 64).sqrt()
    assert ((a.mean(0) - b.mean(0)).abs() < 5 * se + 1e-6).all()  # same mean within 5 standard errors
    assert (a.std(0) / b.std(0)).log().abs().max() < 0.7  # and similar spread
    # The graph draws random numbers in the model's order: same seed, same output.
    with torch.no_grad():
        torch.manual_seed(7)
        want = model(input_ids=ids, attention_mask=mask).logits
        torch.manual_seed(7)
        assert torch.equal(pm(input_ids=ids, attention_mask=mask).logits, want)


def test_export_frontend_needs_example_inputs_and_rejects_unknown_frontends():
    with pytest.raises(pbp_fx.TraceError, match="needs example inputs"):
        pbp_fx.trace(nn.Linear(2, 2), frontend="export")
    with pytest.raises(ValueError, match="frontend"):
        pbp_fx.trace(nn.Linear(2, 2), (torch.randn(2, 2),), frontend="jit")


# -- the CLI -----------------------------------------------------------------------------------------

HF_MODEL_FILE = '''
import torch
import transformers


def build_model():
    cfg = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                  vocab_size=50, max_position_embeddings=32, num_labels=2)
    return transformers.BertForSequenceClassification(cfg)


def example_inputs():
    return ()


def example_kwargs():
    g = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 50, (2, 5), generator=g), "attention_mask": torch.ones(2, 5, dtype=torch.long)}
'''


def test_transform_takes_a_hugging_face_model_file(tmp_path, capsys):
    import json

    from pbp_fx import cli

    path = tmp_path / "hf_model.py"
    path.write_text(HF_MODEL_FILE)
    out = tmp_path / "out"
    assert cli.main(["transform", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "BertForSequenceClassification" in printed and "frontend: torch.export" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["frontend"] == "export" and report["modes"] == "train+eval"
    assert report["num_sites"] == 6 + 2  # q, k, v, attention output, intermediate, output; pooler, classifier
    assert {s["kind"] for s in report["sites"]} == {"linear"}
    compile((out / "perforated_graph.py").read_text(), "perforated_graph.py", "exec")
    assert cli.main(["transform", str(path), "--frontend", "fx"]) == 2  # symbolic tracing cannot do it
    assert "cannot trace" in capsys.readouterr().err


def test_example_kwargs_contract(tmp_path):
    from pbp_fx.errors import ModelFileError
    from pbp_fx.modelfile import example_kwargs, load_model_file

    base = "import torch\nfrom torch import nn\ndef build_model():\n    return nn.Linear(2, 2)\n" \
           "def example_inputs():\n    return ()\n"
    cases = {"none": ("", {}), "dict": ("def example_kwargs():\n    return {'input': torch.zeros(1, 2)}\n", None),
             "bad": ("def example_kwargs():\n    return [1]\n", "not a dict"),
             "raises": ("def example_kwargs():\n    raise ValueError('nope')\n", "raised ValueError: nope")}
    for name, (extra, want) in cases.items():
        path = tmp_path / f"{name}.py"
        path.write_text(base + extra)
        mod = load_model_file(path)
        if isinstance(want, str):
            with pytest.raises(ModelFileError, match=want):
                example_kwargs(mod)
        elif want == {}:
            assert example_kwargs(mod) == {}
        else:
            assert list(example_kwargs(mod)) == ["input"]


def test_gpt2_with_its_default_cache_perforates_every_linear_layer():
    """use_cache=True (GPT-2's default) returns a cache neither frontend captures: the submodules
    are perforated in place, every Conv1D (a Linear outside torch.nn) among them, exactly."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64)
    model, ids = transformers.GPT2LMHeadModel(cfg).eval(), _tokens()[0]
    with pytest.warns(UserWarning, match="neither fx nor torch.export"):
        pm = pbp_fx.perforate(model, example_kwargs={"input_ids": ids})
    assert pm.graph_module.meta["pbp_frontend"] == "parts"
    assert len(pm.sites) == 2 * 4 + 1 and "transformer.h.1.mlp.c_proj" in pm.sites and "lm_head" in pm.sites
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(input_ids=ids).logits, model(input_ids=ids).logits)

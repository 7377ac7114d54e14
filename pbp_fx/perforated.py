"""PerforatedModel: the perforated graph, its Sites, and phase switching.

`perforate(model, example_inputs)` = trace -> find_sites -> insert_dendrites on a deep copy
of `model` (the user's model is never modified).
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
import numbers
from typing import Callable, Iterator, Optional, Union

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from .config import ConfigError, PBConfig
from .errors import NoSitesError, PBError, PhaseError, TrainingError, warn_at_user
from .inputs import describe_inputs
from .layers import WEIGHT_HOOKS, has_user_hooks
from .site import ACTIVATIONS, MODES, POOL_SETTINGS, FusedSite, FusedSwappedNeuron, Site
from .signature import CallError, CallSignature
from .tracing import (DYNAMIC_CHOICES, FX_CONSTANT, LOSS_KEYWORD, TracedPart, batch_size, buffers_kept,
                      copy_module, is_lifted_constant, keep_out_of_state_dict_on_copy, keyword_changes_output,
                      memo_computed_tensors, output_as_traced,
                      parts_model, passes_every_input_positionally, refuse_script_modules,
                      spec_copy_warnings_ignored, tensors_copied, trace, whole_model_in_mode)

__all__ = ["PerforatedModel", "perforate", "PHASES", "outside_inference_mode", "perforated_inside", "put_back"]


def graph_input_dtypes(graph_module: fx.GraphModule) -> dict:
    """{graph input name: dtype} of the inputs whose dtype a torch.export graph asserts
    (aten._assert_tensor_metadata on a placeholder); {} for a symbolic trace, which asserts none."""
    found = graph_module.meta.get("pbp_input_dtypes")
    if found is None:
        check = torch.ops.aten._assert_tensor_metadata.default
        found = {n.args[0].target: n.kwargs["dtype"] for n in graph_module.graph.find_nodes(op="call_function", target=check)
                 if n.args and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"
                 and n.kwargs.get("dtype") is not None}
        graph_module.meta["pbp_input_dtypes"] = found  # (the inputs keep their dtypes when dendrites are added)
    return found


def outside_inference_mode(method):
    """Run a method that changes the model's structure or state outside torch.inference_mode:
    called inside it (an evaluation loop's `with torch.inference_mode(): ctl.step(acc)`), the
    tensors it makes would be inference tensors, which the next training step cannot update."""
    @functools.wraps(method)
    def run(*args, **kwargs):
        with torch.inference_mode(False):
            return method(*args, **kwargs)
    return run

PHASES = ("neuron", "dendrite")


def takes_loss_keyword(model: nn.Module) -> bool:
    """Whether the Hugging Face Trainer passes `model` its loss keyword: its `accepts_loss_kwargs`
    when it has one, else whether forward takes `**kwargs` (the Trainer's own rule)."""
    if hasattr(model, "accepts_loss_kwargs"):
        return bool(model.accepts_loss_kwargs)
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


# Distinct values of an untraced keyword checked against the original model (one extra forward of it each)
# before every value is taken as one the output does not depend on: a step counter passed along would
# otherwise cost that forward at every call.
UNTRACED_VALUES_CHECKED = 4


class PerforatedModel(nn.Module):
    """A traced model with a Site after every neuron layer; called exactly like the original."""

    def __init__(self, graph_module: fx.GraphModule, mode: str = PBConfig.mode, activation: str = PBConfig.activation,
                 capture: Optional[dict] = None, source: Optional[nn.Module] = None):
        super().__init__()
        self.graph_module = graph_module
        # The model the graph was traced from (sharing its submodules), not registered: it is
        # run only to decide whether an untraced keyword input changes the output.
        object.__setattr__(self, "_source", source)
        # Untraced keywords checked and dropped: name -> copies of the values approved, or True (every value)
        self._untraced_ok: dict[str, Union[list, bool]] = {}
        self.mode, self.activation = mode, activation
        # How the graph was captured (JSON: frontend and its options, leaves, input signature);
        # checkpoints store it so that load() re-captures the model the same way.
        self.capture: dict = dict(capture or {})
        self.phase = "neuron"
        self.register_load_state_dict_post_hook(_pool_left_out)
        self.register_load_state_dict_post_hook(_fx_constants_left_out)
        # Names of parameters frozen for the dendrite phase, thawed when it ends.
        self._thaw: list[str] = []
        # Buffers (BN running stats) at the start of the dendrite phase, held through it
        # (_hold_phase_buffers) and restored at its end: train-mode forwards would otherwise move
        # them although no weight changes.
        self._frozen_buffers: dict[str, torch.Tensor] = {}
        self._held_buffers: list = []  # each held buffer's name path, with its value (`_hold_buffers`)
        # Keyword arguments of torch.utils.checkpoint while activation checkpointing is on, else None.
        self.checkpointing: Optional[dict] = None
        # The checkpoint file pbp_fx.load last read into this model (absolute path), else None: a
        # trainer callback resuming the run finds the controller state saved beside it.
        self.loaded_from: Optional[str] = None
        # {mode: {path: training}}: modules that the original's own train() leaves in another mode than
        # the one asked for (mmdetection's norm_eval keeps BatchNorms in eval mode), which pm.train(mode)
        # sets so too (`train_overrides`); {} for models whose train() sets every module's mode.
        self.train_overrides: dict = {}
        self._grad_scaler = None
        # The type of each module whose tensors the graphs read as attributes (get_attr), by path: the graph
        # reads them without calling the module, so a module put there later is never run
        # (`check_modules_as_captured`).
        self._read_owners = _read_owner_types(graph_module)
        signature = self.forward_signature
        if signature is not None and type(self) is PerforatedModel:
            self.__class__ = _with_signature(signature)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            graph = self.__dict__.get("_modules", {}).get("graph_module")
            if graph is None or name.startswith("_") or not hasattr(graph, name):
                raise
        # (not forwarded: a framework probing pm for its own attributes would find the model's children)
        raise AttributeError(f"'{type(self).__name__}' object has no attribute {name!r}: the model's layers are its "
                             f"graph's, pm.graph_module.{name}")

    def __reduce_ex__(self, protocol):
        # The class with the original's signature is made per model (like fx.GraphModule's):
        # pickle it as a recipe, not by name.
        if type(self) is PerforatedModel or self.forward_signature is None:
            return super().__reduce_ex__(protocol)
        return _new_with_signature, (self.forward_signature,), self.__getstate__()

    def __getstate__(self) -> dict:
        # torch's unpickled GraphModule starts with an empty meta (the capture's records: the input
        # signature, the output structure): kept here, by the graph module's path.
        guards = next((path for path, m in self.named_modules() if path.rpartition(".")[2] == "_guards_fn"), None)
        if guards is not None:  # (torch.export's input check, code made at capture: pickle cannot hold it)
            raise PBError(f"this model was captured with torch.export, whose input-guard function ({guards}) cannot be "
                          "pickled, so torch.save(pm) / pickle cannot write it: save it with pbp_fx.save(pm, path) and "
                          "load it with pbp_fx.load(path, model), or perforate with frontend='fx'")
        state = dict(super().__getstate__())  # (a copy: object's is the live __dict__)
        # ... and registers every buffer its graph reads as persistent: which are not is kept too.
        graphs = [(path, g) for path, g in self.named_modules() if isinstance(g, fx.GraphModule)]
        state["_graph_metas"] = {path: dict(g.meta) for path, g in graphs if g.meta}
        state["_graph_non_persistent"] = {path: sorted(g._non_persistent_buffers_set) for path, g in graphs}
        return state

    def __setstate__(self, state: dict) -> None:
        metas = state.pop("_graph_metas", {})
        non_persistent = state.pop("_graph_non_persistent", {})
        super().__setstate__(state)
        modules = dict(self.named_modules())
        for path, meta in metas.items():
            if isinstance(modules.get(path), fx.GraphModule):
                modules[path].meta.update({k: v for k, v in meta.items() if k not in modules[path].meta})
        for path, names in non_persistent.items():
            if isinstance(modules.get(path), fx.GraphModule):
                g = modules[path]
                g._non_persistent_buffers_set.update(n for n in names if n in g._buffers)

    @property
    def forward_signature(self) -> Optional[inspect.Signature]:
        """The original forward's signature, which `forward` shows (None: unknown)."""
        call = self.call_signature
        if call is not None:
            return call.signature
        root = parts_model(self.graph_module)  # a parts graph calls the original's root as it is
        return None if root is None else inspect.signature(root.forward)

    @property
    def source_model(self) -> Optional[nn.Module]:
        """The copy of the original model the graph was traced from (it shares the graph's
        parameters; the perforated graph, not this, is what runs). It holds no dendrites: its
        own save_pretrained writes the neurons alone."""
        return self._source

    def _get_name(self) -> str:
        """The original model's class name: frameworks identify an architecture by it (the Hugging Face
        Trainer shifts a causal LM's labels for label smoothing only when the name is one; with
        "PerforatedModel" it smoothed the unshifted loss). `repr(pm)` still starts "PerforatedModel"."""
        source = self.__dict__.get("_source")
        return type(source).__name__ if source is not None else "PerforatedModel"

    def __repr__(self) -> str:
        return "PerforatedModel" + super().__repr__()[len(self._get_name()):]

    def save_pretrained(self, *_args, **_kwargs):
        """Refused in one line: a PerforatedModel is no Hugging Face PreTrainedModel, and its source
        model's save_pretrained would write the neurons without the dendrites, silently."""
        raise PBError("a PerforatedModel has no save_pretrained or push_to_hub (its source model's would write the "
                      "neurons without the dendrites): save it with pbp_fx.save(pm, path) and reload it with pbp_fx.load(path, "
                      "build_model), or deploy pm.finalize() or pbp_fx.export_onnx(pm, ...)")

    push_to_hub = save_pretrained

    @property
    def call_signature(self) -> Optional[CallSignature]:
        """The original forward's signature and the traced input pattern (None: traced without inputs)."""
        return self.graph_module.meta.get("pbp_call")

    @property
    def config(self):
        """The original model's `config` (a Hugging Face PretrainedConfig, which trainers read); an
        AttributeError when it has none."""
        source = parts_model(self.graph_module) or self._source
        if source is None or not hasattr(source, "config"):
            raise AttributeError(f"{type(source).__name__} has no config")
        return source.config

    @property
    def accepts_loss_kwargs(self) -> bool:
        """Whether forward takes the Hugging Face Trainer's loss keyword `num_items_in_batch` (the
        Trainer reads this attribute first): only when the graph was traced with it. Otherwise the
        Trainer scales the loss for gradient accumulation itself and never passes the keyword,
        which the graph cannot take (a causal LM's loss uses it). A parts graph calls the original's
        forward as it is: the original's answer (`takes_loss_keyword`)."""
        call = self.call_signature
        if call is None:
            root = parts_model(self.graph_module)
            return root is not None and takes_loss_keyword(root)
        for name, param in call.signature.parameters.items():
            traced = call.traced.get(name)
            if param.kind is inspect.Parameter.VAR_KEYWORD and LOSS_KEYWORD in (traced or {}):
                return True
            if name == LOSS_KEYWORD and traced is not None:
                return True
        return False

    def forward(self, *args, **kwargs):
        """Called like the original model: positional `None`s, defaults, keyword-only inputs.

        A keyword the original takes through `**kwargs` that was not traced (the Hugging Face
        Trainer's `num_items_in_batch`) is dropped when it does not change the original's
        output, and refused with a CallError when it does: checked again for each new value, up to
        UNTRACED_VALUES_CHECKED values, after which the keyword is taken as one the output does not
        depend on (the Trainer's token count, which changes every step: once)."""
        call = self.call_signature
        if call is None or call.is_plain(args, kwargs):
            return self._run_graph(args, kwargs)
        g_args, g_kwargs, extra = call.bind(args, kwargs)
        for key in extra:
            if not self._approved(key, kwargs.get(key)):
                self._check_untraced(key, args, kwargs)
        count = g_kwargs.get(LOSS_KEYWORD)
        if isinstance(count, torch.Tensor):
            # A token count: the Trainer passes it as an int64 sum or, divided by its parallel
            # sizes, a float; a graph torch.export captured asserts the example's dtype.
            dtype = graph_input_dtypes(self.graph_module).get(LOSS_KEYWORD, count.dtype)
            if count.dtype.is_floating_point and not dtype.is_floating_point and bool((count != count.round()).any()):
                raise CallError(f"{LOSS_KEYWORD}={float(count)} is fractional (the Trainer divides the count by its "
                                f"parallel sizes) and the graph was captured with an integer one: perforate with "
                                f"example_kwargs holding '{LOSS_KEYWORD}': torch.tensor(float(<count>))")
            g_kwargs[LOSS_KEYWORD] = count.to(dtype)
        return self._run_graph(g_args, g_kwargs)

    def _check_dendrite_phase_mode(self) -> None:
        """Warn once per phase of an eval-mode forward with gradients on before any train-mode one:
        a training loop that left the model in eval mode (after its validation), where the
        candidates do not run, so the loss has no gradient (torch then raises "element 0 of
        tensors does not require grad")."""
        trained = getattr(self, "_dendrite_phase_trained", True)  # (a model pickled before it existed: True)
        if self.training:
            if not trained:  # (an nn.Module attribute write costs: once per phase, not per forward)
                self._dendrite_phase_trained = True
        elif not trained and torch.is_grad_enabled():
            self._dendrite_phase_trained = True  # (said once)
            if any(int(s.candidates.batches_seen) for s in self.sites.values() if s.candidates is not None):
                return  # (a phase resumed from a checkpoint has trained: its loop may evaluate first)
            warn_at_user("dendrite phase: the model runs in eval mode with gradients on, where its candidates do "
                         "not run, so a loss of this output has no gradient: call model.train() before the "
                         "training steps")

    def _warn_stride_unused(self) -> None:
        """Warn once per phase, after its first train-mode forward, when a position stride > 1
        was asked for and no site's candidates had positions to stride."""
        self._stride_unchecked = False
        pools = [s.candidates for s in self.sites.values() if s.candidates is not None]
        if any(p.positions_strided for p in pools):
            return
        warn_at_user(f"candidate_stride={self._stride_asked} strides no site of {self._model_name()}: its Linear "
                     "sites read no token dims ([B, C] inputs) and its convs have no strided form (an even kernel's "
                     "'same' padding), so every candidate sees every position and the dendrite phase costs what it "
                     "costs at stride 1; drop the setting (candidate_stride=1)")

    def _graph_holding_buffers(self, *args, **kwargs):
        """The graph's call in the dendrite phase: the frozen buffers held after it
        (`_hold_phase_buffers`), also after the recompute of activation checkpointing."""
        try:
            return self.graph_module(*args, **kwargs)
        finally:
            self._hold_phase_buffers()

    def _hold_buffers(self, values: dict[str, torch.Tensor]) -> None:
        """The buffers a dendrite phase holds ({} outside one), with their name paths: set here,
        not at the first call, so that a compiled forward has one guard value per phase."""
        self._frozen_buffers = values
        self._held_buffers = [(name.split("."), value) for name, value in values.items()]

    def _hold_phase_buffers(self) -> None:
        """Dendrite phase: the frozen layers' buffers (BatchNorm running statistics) back to their
        values at the phase start.

        Why: the neurons are frozen, but a training-mode forward still moves their running
        statistics, and evaluation, finalize, export and checkpoints during the phase would see
        values that its end (which restores them) throws away. Written through .data: the
        forward's saved tensors keep their version, so its backward runs (BatchNorm's
        training-mode backward does not read the running statistics).
        """
        places = getattr(self, "_held_buffers", None)  # (a model pickled before it existed has none)
        if places is None:
            places = [(name.split("."), value) for name, value in self._frozen_buffers.items()]
            self._held_buffers = places
        put_back(self, places)

    def train(self, mode: bool = True):
        super().train(mode)
        for path, training in getattr(self, "train_overrides", {}).get(bool(mode), {}).items():
            self.get_submodule(path).training = training
        return self

    def __deepcopy__(self, memo):
        with spec_copy_warnings_ignored():  # (copy.deepcopy as usual otherwise)
            new = type(self).__new__(type(self))
            memo[id(self)] = new
            new.__dict__.update(copy.deepcopy(self.__dict__, memo_computed_tensors(self, memo)))
            return new

    def _apply(self, fn, *args, **kwargs):
        # (the stacked tensors of candidates and dendrites, and their gradients, which _apply converts
        # too: a conv's have one dim more than its weight)
        stacked = {id(t) for site in getattr(self, "sites", {}).values() for part in (site.candidates, site.dendrites)
                   if isinstance(part, nn.Module) for p in [*part.parameters(), *part.buffers()]
                   for t in (p, p.grad) if t is not None}
        fn = _format_where_it_fits(fn, stacked)
        # .to() / .double() convert the buffers: the held values follow.
        out = super()._apply(fn, *args, **kwargs)
        self._hold_buffers({n: fn(v) for n, v in self._frozen_buffers.items()})
        return out

    def _run_graph(self, args: tuple, kwargs: dict):
        if self.phase == "dendrite" and not torch.compiler.is_compiling():
            self._check_dendrite_phase_mode()
        graph = self._graph_holding_buffers if self._frozen_buffers else self.graph_module
        if self.checkpointing is not None and self.training and torch.is_grad_enabled():
            from functools import partial

            from torch.utils.checkpoint import checkpoint

            # Keyword inputs through partial: checkpoint() has keywords of its own.
            out = checkpoint(partial(graph, **kwargs), *args, use_reentrant=False, **self.checkpointing)
        else:
            out = self._call_graph(graph, args, kwargs)
        if self.phase == "dendrite" and getattr(self, "_stride_unchecked", False) and self.training \
                and not torch.compiler.is_compiling():
            self._warn_stride_unused()
        return output_as_traced(self.graph_module, out)

    def _call_graph(self, graph: fx.GraphModule, args: tuple, kwargs: dict):
        least, most = self.graph_module.meta.get("pbp_min_batch", 1), self.graph_module.meta.get("pbp_max_batch")
        given = batch_size(args, kwargs) if least > 1 or most is not None else 0
        if given and (given < least or (most is not None and given > most)):
            sizes = f"{least} or more" if most is None else f"{least} to {most}"
            loader = " (DataLoader(drop_last=True))" if most is None else ""
            raise CallError(f"{self._model_name()}'s forward computes other outputs at a batch of {given} than its "
                            f"graph, which torch.export captured for batches of {sizes} (the forward branches on the "
                            f"batch size): call it with batches of {sizes}{loader}, or perforate it with a batch-{given} "
                            "example for such calls")
        try:
            return graph(*args, **kwargs)
        except RuntimeError as exc:
            # torch.export's dtype assertion on an input: it does not say which input
            if not str(exc).startswith("Tensor dtype mismatch"):
                self._raise_input_rank(args, kwargs, exc)
                raise
            self._raise_input_dtype(args, kwargs, exc)
            raise
        except AssertionError as exc:
            # torch.export's input check of a graph captured with static or bounded shapes
            if not str(exc).startswith("Guard failed"):
                self._raise_input_rank(args, kwargs, exc)
                raise
            dynamic = self.graph_module.meta.get("pbp_dynamic", "static")
            raise CallError(f"{self._model_name()} was captured with {dynamic} shapes and this call breaks them "
                            f"({exc}): call it with the shapes given to perforate(), or capture it anew with "
                            f"inputs of the shapes you need") from None
        except Exception as exc:
            if isinstance(exc, (AttributeError, KeyError)):  # (the graph reads a module that was changed since)
                try:
                    self.check_modules_as_captured()
                except PBError as changed:
                    raise changed from exc
            self._raise_input_rank(args, kwargs, exc)
            raise

    def _model_name(self) -> str:
        return self.call_signature.model_name if self.call_signature is not None else "the model"

    def _graph_inputs_given(self, args: tuple, kwargs: dict) -> dict:
        """{graph input name: the value this call gives it}."""
        names = [n.target for n in self.graph_module.graph.find_nodes(op="placeholder")]
        given = dict(zip(names, pytree.tree_leaves(args)))  # (the placeholders of nested inputs are their leaves)
        for key, value in kwargs.items():
            leaves, nested = pytree.tree_leaves(value), [n for n in names if n.startswith(f"{key}_")]
            given.update({key: value} if isinstance(value, torch.Tensor) else
                         dict(zip(nested, leaves)) if len(nested) == len(leaves) else {})
        return given

    def _raise_input_rank(self, args: tuple, kwargs: dict, exc: Exception) -> None:
        """CallError naming the first graph input this call gives another number of dims than a torch.export
        capture had (the graph's failure inside its generated code, an IndexError, named nothing); nothing
        otherwise, and nothing for a symbolic trace, which takes any rank its model takes."""
        if self.graph_module.meta.get("pbp_frontend") != "export":
            return
        given = self._graph_inputs_given(args, kwargs)
        for node in self.graph_module.graph.find_nodes(op="placeholder"):
            meta, value = node.meta.get("tensor_meta"), given.get(node.target)
            if isinstance(value, torch.Tensor) and meta is not None and hasattr(meta, "shape") and \
                    value.dim() != len(meta.shape):
                raise CallError(f"{self._model_name()} was captured with {node.target} of {len(meta.shape)} dims "
                                f"{list(meta.shape)}, and this call gives it {value.dim()} {list(value.shape)}, which "
                                f"the graph fails on ({type(exc).__name__}): call it with {len(meta.shape)}-dim "
                                f"inputs, or perforate it with an example of the rank you need") from exc

    def _raise_input_dtype(self, args: tuple, kwargs: dict, exc: Exception) -> None:
        """CallError naming the graph input whose dtype is not the one torch.export captured."""
        given = self._graph_inputs_given(args, kwargs)
        for name, dtype in graph_input_dtypes(self.graph_module).items():
            value = given.get(name)
            if isinstance(value, torch.Tensor) and value.dtype != dtype:
                raise CallError(f"{self._model_name()} was captured by torch.export with {name} of dtype {dtype}, this "
                                f"call passes {value.dtype}: pass {name}.to({dtype}), or perforate with an example "
                                f"whose {name} is {value.dtype}") from exc

    # -- activation checkpointing ----------------------------------------------------
    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: Optional[dict] = None,
                                        every_n_layers: int = 1, offload: bool = False) -> None:
        """Recompute activations in backward (torch.utils.checkpoint, non-reentrant) to save memory.

        The traced graph has no layer boundaries, so the whole perforated graph is one
        checkpointed segment: in training, forward keeps only its inputs and backward runs it
        again. The covariance tap still counts each batch once. Named like the Hugging Face
        method, so `TrainingArguments(activation_checkpointing=True)` works; `every_n_layers`
        other than 1, `offload=True` and `use_reentrant=True` are refused (one line each).
        """
        kw = dict(activation_checkpointing_kwargs or {})
        if kw.pop("use_reentrant", False):
            raise TrainingError("activation checkpointing of a perforated model is non-reentrant (the whole "
                                "graph is one segment): drop use_reentrant=True")
        if every_n_layers != 1 or offload:
            raise TrainingError(f"activation checkpointing of a perforated model checkpoints the whole graph as one "
                                f"segment: every_n_layers={every_n_layers} / offload={offload} are not supported, "
                                f"use the defaults (1, False)")
        self.checkpointing = kw

    def activation_checkpointing_disable(self) -> None:
        self.checkpointing = None

    # The deprecated Hugging Face names (still called by Trainer for models without the new ones).
    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: Optional[dict] = None, **kw) -> None:
        self.activation_checkpointing_enable(gradient_checkpointing_kwargs, **kw)

    def gradient_checkpointing_disable(self) -> None:
        self.activation_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.checkpointing is not None

    def _check_untraced(self, key: str, args: tuple, kwargs: dict) -> None:
        """Run the source model with and without `key` (`keyword_changes_output`)."""
        source = self._source
        name = type(source).__name__ if source is not None else "the model"
        refuse = (f"keyword input {key!r} was not given to perforate() and {name} may use it: "
                  f"pass it in example_kwargs to perforate()")
        if source is None:
            raise CallError(refuse)
        if keyword_changes_output(source, args, kwargs, key):
            raise CallError(refuse.replace("may use it", "uses it (its output changes)"))
        seen = self._untraced_ok.setdefault(key, [])
        seen.append(_kept_copy(kwargs.get(key)))  # (a copy: the caller may change the object it passed)
        if key == LOSS_KEYWORD:
            self._untraced_ok[key] = True
        elif len(seen) >= UNTRACED_VALUES_CHECKED:
            self._untraced_ok[key] = True
            warn_at_user(f"keyword input {key!r}, which perforate() did not trace, left {name}'s output unchanged at "
                         f"{UNTRACED_VALUES_CHECKED} values: it is taken as unused from now on and not checked again; "
                         "if it can matter (a padding mask), pass it in example_kwargs to perforate()")

    def _approved(self, key: str, value) -> bool:
        """Whether `_check_untraced` approved this value of the keyword (or every value: see
        UNTRACED_VALUES_CHECKED)."""
        seen = self._untraced_ok.get(key, [])
        return seen is True or any(_same_value(value, v) for v in seen)

    # -- structure -------------------------------------------------------------------
    @property
    def sites(self) -> dict[str, Site]:
        """Site modules by name, in graph order (sites inside untraceable leaves last)."""
        gm = self.graph_module
        out: dict[str, Site] = {}
        leaf_sites: list[Site] = []
        for node in gm.graph.nodes:
            if node.op != "call_module":
                continue
            m = gm.get_submodule(node.target)
            if isinstance(m, Site):
                out.setdefault(m.name, m)
            else:
                leaf_sites.extend(s for s in m.modules() if isinstance(s, Site))
        for s in leaf_sites:
            out.setdefault(s.name, s)
        return out

    def neuron_weight(self, site: str) -> Optional[torch.Tensor]:
        """The weight tensor of a site's neuron layer (through the `SwappedNeuron` of one inside
        an untraceable leaf), None where it cannot be found."""
        spec = getattr(self.sites[site], "spec", None)
        return None if spec is None else self._neuron_tensor(spec, spec.weight)

    def neuron_tensors(self, site: str) -> list[torch.Tensor]:
        """The tensors of a site's neuron layer that can be found: its weight, bias and joined norm's."""
        spec = getattr(self.sites[site], "spec", None)
        paths = [] if spec is None else [spec.weight, spec.bias, *spec.norm_tensors.values()]
        return [t for t in (self._neuron_tensor(spec, path) for path in paths) if t is not None]

    def _neuron_tensor(self, spec, path: Optional[str]) -> Optional[torch.Tensor]:
        from pbp_fx.passes.patterns import attr_tensor

        if path is None:
            return None
        try:
            owner = self.graph_module.get_submodule(spec.graph) if spec.graph else self.graph_module
            tensor = attr_tensor(owner, path)
        except AttributeError:
            return None
        return tensor if isinstance(tensor, torch.Tensor) else None

    @property
    def code(self) -> str:
        """Readable Python of the perforated graph."""
        return self.graph_module.code

    @property
    def num_dendrites(self) -> dict[str, int]:
        return {name: s.num_dendrites for name, s in self.sites.items()}

    def num_parameters(self, candidates: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameters of the model (shared ones once), without the candidate pools unless asked.

        exclude_embeddings: leave out nn.Embedding tables that are still modules (Hugging Face
        Trainer asks for this count in its FLOP estimate; torch.export graphs hold no modules).
        """
        skip = self._unread_parameters()
        if exclude_embeddings:
            skip.update(id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding))
        sites = self.sites.values()  # (a walk of the graph: once; the Trainer asks at every step)
        if not candidates:
            for s in sites:
                if s.candidates is not None:
                    skip.update(id(p) for p in s.candidates.parameters())
        total = sum(p.numel() for p in self.parameters() if id(p) not in skip)
        # U is stored [K, C, K] but only j < k is read: count the C*K*(K-1)/2 used entries.
        unused = sum(s.channels * s.num_dendrites * (s.num_dendrites + 1) // 2 for s in sites)
        return total - unused

    def _unread_parameters(self) -> set:
        """ids of parameters no graph reads: torch.export's module keeps every parameter of the model,
        a module forward never calls included, as a get_attr node without users (symbolic tracing
        leaves such modules out). The Hugging Face Trainer counts parameters at every step, so the
        graphs are walked once: their unread get_attr targets are kept, by graph."""
        graphs = [m for m in self.modules() if isinstance(m, fx.GraphModule)]
        key = tuple(id(gm.graph) for gm in graphs)
        if getattr(self, "_unread_targets", (None,))[0] != key:
            read, unread = set(), {}
            for i, gm in enumerate(graphs):
                for node in gm.graph.nodes:
                    if node.op != "get_attr":
                        continue
                    try:
                        p = gm.get_parameter(node.target)
                    except AttributeError:  # (a buffer or a constant)
                        continue
                    if node.users:
                        read.add(id(p))
                    else:
                        unread[id(p)] = (i, node.target)
            self._unread_targets = (key, [where for pid, where in unread.items() if pid not in read])
        return {id(graphs[i].get_parameter(target)) for i, target in self._unread_targets[1]}

    def summary(self) -> list[dict]:
        """One row per site: name, kind, channels, norm, dendrites, params per new dendrite."""
        return [{"name": n, "kind": s.kind, "channels": s.channels, "norm": s.norm is not None,
                 "dendrites": s.num_dendrites, "params_per_dendrite": s.params_per_dendrite}
                for n, s in self.sites.items()]

    @outside_inference_mode
    def grow(self, init: str = "random", generator: Optional[torch.Generator] = None) -> None:
        """Install one dendrite per site with fresh weights (V = 0: the output does not change);
        drawn from `generator` (a CPU torch.Generator; None: torch's global one)."""
        self._require_phase("neuron", "grow")
        for s in self.sites.values():
            s.grow(init, generator)

    def finalize(self) -> fx.GraphModule:
        """An eval-only GraphModule: dendrites fused into their neurons, no scaffolding."""
        from pbp_fx.passes import finalize

        self.check_modules_as_captured()
        return finalize(self.graph_module)

    def check_modules_as_captured(self) -> None:
        """PBError when a module whose tensors the graph reads directly is gone or is no longer of its
        captured type: the graph never calls it, so a module put there after perforate (PEFT's
        get_peft_model, a merge_and_unload through source_model) would silently do nothing."""
        modules = dict(self.graph_module.named_modules(remove_duplicate=False))
        for path, kind in getattr(self, "_read_owners", {}).items():
            now = modules.get(path)
            if now is None or not isinstance(now, kind):
                what = "is gone" if now is None else f"is now a {type(now).__module__}.{type(now).__name__}"
                raise PBError(f"pm.graph_module.{path} was a {kind.__name__} when the model was perforated and {what}: "
                              "the captured graph reads its tensors directly, never calling it, so it "
                              f"{'cannot run' if now is None else 'would ignore the new module'} (PEFT's get_peft_model "
                              "or merge_and_unload after perforate, say): make such changes to the model before "
                              "pbp_fx.perforate, and perforate the result")

    # -- phases (docs/algorithm.md) ----------------------------------------------------------
    def _require_phase(self, phase: str, what: str) -> None:
        if self.phase != phase:
            raise PhaseError(f"{what}() needs the {phase} phase, but the model is in the {self.phase} phase")

    @outside_inference_mode
    def start_dendrite_phase(self, pool: int = PBConfig.pool, init: str = PBConfig.candidate_init,
                             init_scale: float = 1.0, generator: Optional[torch.Generator] = None, **stats) -> None:
        """Attach P candidates to every site and freeze everything else (mode "pb" only); their
        weights are drawn from `generator` (a CPU torch.Generator; None: torch's global one).

        In this phase the model's output is unchanged; `loss.backward()` trains only the
        candidates (through the covariance with each site's error), so the optimizer must
        hold `trainable_parameters()`.
        """
        if self.mode != "pb":
            raise PhaseError("the dendrite phase exists only in mode 'pb' (mode 'gd' grows random dendrites)")
        self._require_phase("neuron", "start_dendrite_phase")
        self.check_modules_as_captured()
        unknown = [k for k in stats if k not in POOL_SETTINGS]
        if unknown:  # (before any site has a pool; it named the internal CandidatePool.__init__)
            raise ConfigError(f"start_dendrite_phase(): unknown setting {unknown[0]!r}: use pool, init, init_scale, "
                              f"generator or the pool's {', '.join(POOL_SETTINGS)}")
        PBConfig.check_dendrite_phase_kwargs("start_dendrite_phase", pool=pool, init=init, **stats)
        if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) or not 0 < init_scale < math.inf:
            raise ConfigError(f"start_dendrite_phase(init_scale={init_scale!r}): give a finite number > 0 (the "
                              "candidates' initial weights are scaled by it)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ConfigError(f"start_dendrite_phase(generator={generator!r}): give a CPU torch.Generator, or None "
                              "for torch's global one")
        from pbp_fx.passes.insert_dendrites import record_output_makers

        record_output_makers(self.graph_module)  # (a module swapped in since perforate: the one the graph calls)
        for s in self.sites.values():
            s.start_candidates(pool, init, init_scale, generator, **stats)
            s.candidates.grad_scaler = self.grad_scaler
        cand = {id(p) for s in self.sites.values() for p in s.candidates.parameters()}
        cand_buffers = {id(b) for s in self.sites.values() for b in s.candidates.buffers()}
        self._hold_buffers({n: b.detach().clone() for n, b in self.named_buffers() if id(b) not in cand_buffers})
        self._thaw = []
        for name, p in self.named_parameters():
            if id(p) not in cand and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None  # (a last neuron-phase gradient would enter clipping and norm logs all phase)
                self._thaw.append(name)
        self.phase = "dendrite"
        self._dendrite_phase_trained = False  # (`_check_dendrite_phase_mode`)
        self._stride_asked = stats.get("stride", PBConfig.candidate_stride)
        self._stride_unchecked = isinstance(self._stride_asked, int) and self._stride_asked > 1  # (`_warn_stride_unused`)

    def _restore_buffers(self) -> None:
        buffers = dict(self.named_buffers())
        with torch.no_grad():
            for name, value in self._frozen_buffers.items():
                if name in buffers and buffers[name].shape == value.shape:
                    buffers[name].copy_(value)
        self._hold_buffers({})

    def hold_trainable_neurons(self) -> list[str]:
        """In a dendrite phase: the parameters outside the candidate pools made trainable since the phase
        began (Lightning's BackboneFinetuning thaws a backbone at its epoch), frozen again until the phase
        ends, which thaws them with its own (the candidates train against a model that stays still);
        their names."""
        if self.phase != "dendrite":
            return []
        cand = {id(p) for s in self.sites.values() for p in s.candidates.parameters()}
        held = []
        for name, p in self.named_parameters():
            if id(p) not in cand and p.requires_grad:
                p.requires_grad_(False)
                p.grad = None
                self._thaw.append(name)
                held.append(name)
        return held

    def frozen_parameters(self) -> list[str]:
        """The names of the parameters frozen other than by a dendrite phase (which thaws its own at
        its end), candidates aside: what a checkpoint records, so that a resumed run trains the same set."""
        thawed_later = set(self._thaw)
        return [n for n, p in self.named_parameters()
                if not p.requires_grad and n not in thawed_later and ".candidates." not in n]

    def _end_dendrite_phase(self) -> None:
        params = dict(self.named_parameters())
        for name in self._thaw:
            if name in params:
                params[name].requires_grad_(True)
        for p in params.values():
            # A gradient a neuron gathered during the phase (the user unfroze it then: no optimizer
            # of the phase held it, so no zero_grad cleared it) is the whole phase's sum, stale.
            p.grad = None
        self._thaw = []
        self._stride_unchecked = False
        self.phase = "neuron"

    @outside_inference_mode
    def install_candidates(self, v_init: float = PBConfig.v_init, sites: Optional[list[str]] = None) -> None:
        """Freeze the best candidate of each site as a new dendrite and return to the neuron phase.

        `sites` limits installation to those site names (one name as a str; the others drop their
        candidates); a name that is no site is refused.
        """
        self._require_phase("dendrite", "install_candidates")
        if isinstance(sites, str):  # (one name, not its characters or substrings)
            sites = [sites]
        unknown = [] if sites is None else [n for n in sites if n not in self.sites]
        if unknown:
            raise ConfigError(f"install_candidates(sites=) names no site {unknown[0]!r}: the sites are "
                              f"{', '.join(list(self.sites)[:8])}{', ...' if len(self.sites) > 8 else ''}")
        self._restore_buffers()  # before installing: installed stacks change shape
        for name, s in self.sites.items():
            if sites is None or name in sites:
                s.install_candidates(v_init)
            else:
                s.drop_candidates()
        self._end_dendrite_phase()

    @outside_inference_mode
    def abort_dendrite_phase(self) -> None:
        """Drop every candidate and return to the neuron phase unchanged."""
        self._require_phase("dendrite", "abort_dendrite_phase")
        self._restore_buffers()
        for s in self.sites.values():
            s.drop_candidates()
        self._end_dendrite_phase()

    @property
    def grad_scaler(self):
        """The torch.amp.GradScaler that scales the loss before backward (fp16), else None: every
        candidate pool, now and in later dendrite phases, divides it out of the site error before
        its statistics, and a step the scaler skips is not counted. Trainer callbacks set it."""
        return getattr(self, "_grad_scaler", None)  # (a model pickled before it existed has none)

    @grad_scaler.setter
    def grad_scaler(self, scaler) -> None:
        self._grad_scaler = scaler
        for s in self.sites.values():
            if s.candidates is not None:
                s.candidates.grad_scaler = scaler

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """nn.Module.state_dict, with each further name of a tied tensor (GPT-2's lm_head.weight and
        transformer.wte.weight) given as a copy: writers that refuse shared storage can write it
        (safetensors' save_file, which the HF Trainer uses for a model that is not a
        PreTrainedModel). Loading it back sets the one tensor twice, to the same value."""
        state = super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        if keep_vars or (len(args) > 2 and args[2]):  # (torch's deprecated positional keep_vars)
            return state
        seen = set()
        for name, value in state.items():
            if not isinstance(value, torch.Tensor) or value.device.type == "meta" or not value.numel():
                continue
            try:
                where = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), value.stride())
            except (RuntimeError, NotImplementedError):  # a tensor subclass without one storage
                continue
            if where in seen:
                state[name] = value.clone()
            else:
                seen.add(where)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # A state saved before lifted constants were left out of it (pbp-fx before stop 49) holds them under
        # its capture's names, which another capture of the model (without labels) does not have.
        for key in [k for k in state_dict if k.startswith(prefix) and is_lifted_constant(k)]:
            del state_dict[key]
        # First the load pre-hooks (a framework's StructureOnLoad gives the model the state's structure) and the
        # root's own tensors (it has none: its children, which load after this, hold them all).
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.phase == "dendrite":  # (refused before any tensor loads: Site.resize says why)
            for path, site in self.named_modules():
                key = f"{prefix}{path}.out_weight"
                if isinstance(site, Site) and key in state_dict and state_dict[key].shape[0] != site.num_dendrites:
                    site.resize(state_dict[key].shape[0], where=path)
        # Each site takes the state's number of dendrites first: its own keys' (Site), or none where
        # the state has no key of the site but holds its neuron layer (a state saved before the site
        # grew). A state that holds neither (a head alone, loaded with strict=False) leaves the site
        # as it is: it deleted every dendrite without a word, and missing_keys named none of them.
        # (the sites whose dendrites the state has no out_weight for: none, loading a whole state)
        open_sites = [(f"{prefix}{path}.", site) for path, site in self.named_modules() if isinstance(site, Site)
                      and site.num_dendrites and f"{prefix}{path}.out_weight" not in state_dict]
        if open_sites:
            names = {id(t): n for n, t in [*self.named_parameters(remove_duplicate=False),
                                           *self.named_buffers(remove_duplicate=False)]}
            neurons = {id(s): self.neuron_weight(n) for n, s in self.sites.items()}
            for own, site in open_sites:
                neuron = neurons.get(id(site))
                named = names.get(id(neuron)) if neuron is not None else None
                # (a key of the site's candidate pool, saved in a dendrite phase before any dendrite, says 0 too)
                if named is None or prefix + named in state_dict or any(k.startswith(own) for k in state_dict):
                    site.resize(0, where=own.rstrip("."))

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """What the optimizer must hold in the current phase."""
        # Empty tensors (the cascade of a site's first dendrite) have nothing to train.
        # In parameters() order both phases: a framework that rebuilds its optimizer on resume
        # (named_parameters order) then matches the saved optimizer state position by position.
        if self.phase == "dendrite":
            candidates = {id(p) for s in self.sites.values() for p in s.candidates.parameters()}
            yield from (p for p in self.parameters() if id(p) in candidates and p.numel())
            return
        yield from (p for p in self.parameters() if p.requires_grad and p.numel())

    def candidate_progress(self, rel: float) -> bool:
        """Dendrite phase, once per epoch: True when some site's candidate correlation improved.

        Each site's pool decides (CandidatePool.epoch_progress) and updates its reference, so
        every site is asked, not only up to the first that improved.
        """
        self._require_phase("dendrite", "candidate_progress")
        improved = [s.candidates.epoch_progress(rel) for s in self.sites.values() if s.candidates is not None]
        return any(improved)

    @property
    def dendrites(self) -> int:
        """Dendrites per site, the most any site has (sites grow together)."""
        counts = self.num_dendrites.values()
        return max(counts) if counts else 0

    def phase_buffers(self) -> dict[str, torch.Tensor]:
        """Buffers saved at the start of the dendrite phase (restored when it ends); {} otherwise."""
        return dict(self._frozen_buffers)

    @outside_inference_mode
    def load_phase_buffers(self, buffers: dict[str, torch.Tensor]) -> None:
        """Set what phase_buffers() returns (a checkpoint of a dendrite-phase model restores it)."""
        self._require_phase("dendrite", "load_phase_buffers")

        def beside_its_buffer(name: str, value: torch.Tensor) -> torch.Tensor:  # (a model moved to a GPU first)
            live = _attribute_path(self, name.split("."))
            return value.detach().to(live.device if isinstance(live, torch.Tensor) else value.device, copy=True)

        self._hold_buffers({k: beside_its_buffer(k, v) for k, v in buffers.items()})

    def correlations(self) -> dict[str, torch.Tensor]:
        """Per site, the per-channel best |C~| of its candidates (dendrite phase only)."""
        return {n: s.correlation() for n, s in self.sites.items() if s.candidates is not None}

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, activation={self.activation!r}, phase={self.phase!r}, sites={len(self.sites)}"


def _read_owner_types(graph_module: fx.GraphModule) -> dict[str, type]:
    """path -> type of each module (under `graph_module`, pbp-fx's own left out) holding a tensor that a
    graph reads by get_attr; a part's graph (frontend 'parts') by its path."""
    from pbp_fx.passes.insert_dendrites import SITES_ATTR

    out: dict[str, type] = {}
    for prefix, g in graph_module.named_modules():
        if not isinstance(g, fx.GraphModule):
            continue
        modules = dict(g.named_modules(remove_duplicate=False))
        for node in g.graph.nodes:
            owner = node.target.rpartition(".")[0] if node.op == "get_attr" and isinstance(node.target, str) else ""
            if owner and not owner.startswith(SITES_ATTR + ".") and owner != SITES_ATTR and owner in modules:
                out[f"{prefix}.{owner}" if prefix else owner] = type(modules[owner])
    return out


@outside_inference_mode  # (its copy of the model made inside it would hold inference tensors: untrainable)
def perforate(model: nn.Module, example_inputs=(), include=None, exclude=None,
              activation: str = PBConfig.activation, mode: str = PBConfig.mode, *,
              example_kwargs: Optional[dict] = None,
              frontend: str = "auto", dynamic: Union[bool, str] = True) -> PerforatedModel:
    """Trace a copy of `model`, find its neuron sites and insert dendrite sites (K = 0).

    Right after this the perforated model computes exactly what `model` computes, and is
    called like it: the same positional and keyword inputs, the same output structure.
    include/exclude: module types, qualified-name globs ("layer1.*") or `(name, module) -> bool`.
    example_inputs / example_kwargs: positional (a tensor or a tuple) and keyword example
    inputs (`example_kwargs={"input_ids": ids, "attention_mask": mask}`).
    frontend: "auto" (symbolic tracing, else torch.export), "fx" or "export"; which one was
    used is in `pm.graph_module.meta["pbp_frontend"]`. dynamic (torch.export captures): True,
    every dim dynamic where torch.export allows it, else the batch dim only, else static;
    "batch": the batch dim only (much faster to capture for models whose shapes torch reasons
    about at length, e.g. windowed attention), else static; False: static shapes. What was used
    is in `meta["pbp_dynamic"]`.
    """
    from pbp_fx.passes.find_sites import site_filters

    if isinstance(model, PerforatedModel):
        raise ConfigError("perforate() got a model that is perforated already (its dendrites would get dendrites): "
                          "train it as it is, or perforate the base model")
    if not isinstance(model, nn.Module):
        raise ConfigError(f"perforate() takes an nn.Module, got {type(model).__name__}: pass the model instance")
    inside = perforated_path(model)
    if inside is not None:  # (a compile wrapper or a module holding one: its layers would get two sites each)
        raise ConfigError(f"perforate() got a model that holds a perforated model already (model{inside}): its "
                          "dendrites would get dendrites: train that one as it is, or perforate the base model")
    fused = next((name for name, m in model.named_modules() if isinstance(m, (FusedSite, FusedSwappedNeuron))), None)
    if fused is not None:  # (pm.finalize()'s inference graph: its sites are fused layers no pattern matches)
        raise ConfigError(f"perforate() got a model that is or holds a finalized model (a fused site at "
                          f"{fused or 'its root'}), made for inference, whose fused layers would get dendrites again: "
                          "perforate the base model, or train the PerforatedModel and finalize it again")
    if activation not in ACTIVATIONS:
        raise ConfigError(f"activation {activation!r} is not supported: use one of {sorted(ACTIVATIONS)}",
                          "activation", activation)
    if mode not in MODES:
        raise ConfigError(f"mode {mode!r} is not supported: use 'pb' or 'gd'", "mode", mode)
    if dynamic not in DYNAMIC_CHOICES:
        raise ConfigError(f"dynamic={dynamic!r} is not supported: use True (every dim where torch.export allows "
                          "it), 'batch' (the batch dim only) or False (static shapes)", "dynamic", dynamic)
    if not isinstance(example_inputs, tuple):
        example_inputs = (example_inputs,)
    if type(model).__name__ == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
        # torch.compile's wrapper: its forward is no code to capture, and its parameter names
        # carry "_orig_mod." (a checkpoint's sites would not match the uncompiled model's)
        warn_at_user("perforate captures the model torch.compile wraps (model._orig_mod): the PerforatedModel runs "
                     "uncompiled; torch.compile(pm) to compile it")
        model = model._orig_mod
    # Capture runs the model: one that writes its input in place (ReLU(inplace=True) on x) would
    # change the caller's tensors.
    example_inputs, example_kwargs = tensors_copied((example_inputs, example_kwargs))
    include, exclude = site_filters(include, exclude)  # checked before any work; searched twice below
    _materialize_lazy(model, example_inputs, example_kwargs)
    model = copy_module(model)
    _drop_root_hooks(model, frontend, example_inputs, example_kwargs)
    _warn_dropped_checkpointing(model)
    # The copy's buffers end as the model's: capture and site matching run its forward and read its
    # weights, and a parametrization updates buffers when read in train mode (spectral_norm's _u).
    with buffers_kept(model):
        return _perforated_copy(model, example_inputs, example_kwargs, frontend, dynamic, include, exclude,
                                mode, activation)


def _materialize_lazy(model: nn.Module, example_inputs: tuple, example_kwargs: Optional[dict]) -> None:
    """Lazy layers not run yet (nn.LazyLinear) get their parameters at the model's first call, drawn
    from the global generator: it is made now, on the example (eval mode, no gradients, buffers
    kept), so the perforated copy and the model hold the same weights (the copy drew its own)."""
    if not any(nn.parameter.is_lazy(p) for p in model.parameters()):
        return
    with whole_model_in_mode(model, False), buffers_kept(model), torch.no_grad():
        try:
            model(*example_inputs, **(example_kwargs or {}))
        except Exception:  # noqa: BLE001 - capture reports a model that does not run on its example
            return


def _drop_root_hooks(model: nn.Module, frontend: str, example_inputs: tuple, example_kwargs: Optional[dict]) -> None:
    """Forward hooks of the user's on the model itself run outside its forward, where symbolic
    tracing starts: said, and dropped from the copy (auto then captures the same model whichever
    frontend it takes). frontend='export' keeps them where torch.export captures them as the caller
    called: an example that passes every input of forward positionally."""
    if not has_user_hooks(model):
        return
    if frontend == "export":
        if passes_every_input_positionally(model, example_inputs, example_kwargs or {}):
            warn_at_user(f"{type(model).__name__} has forward hook(s) or pre-hook(s) on itself: torch.export captures "
                         "what they compute into the graph, so one that only records (appends an output to a list) "
                         "runs at capture, not at the perforated model's calls: register such a hook on it")
            return
        how = ("torch.export captures them only from an example that passes every input of forward positionally "
               "(these are passed by name or left at their defaults)")
    else:
        how = ("frontend='export' captures them from an example that passes every input of forward positionally "
               "(hooks on submodules are kept)")
    warn_at_user(f"{type(model).__name__} has forward hook(s) or pre-hook(s) on itself, which run outside its "
                 f"forward, where capture starts: the perforated model runs without them; register them on it to "
                 f"keep them; {how}")
    model._forward_hooks.clear()
    for key, hook in list(model._forward_pre_hooks.items()):
        if not isinstance(hook, WEIGHT_HOOKS):
            del model._forward_pre_hooks[key]


def _perforated_copy(model, example_inputs, example_kwargs, frontend, dynamic, include, exclude, mode,
                     activation) -> "PerforatedModel":
    from pbp_fx.passes import find_sites, insert_dendrites
    from pbp_fx.passes.patterns import EXPORT_CAPTURES_IT

    refuse_script_modules(model)  # (a frozen one has no .training to read below)
    # The model's modes by path, before capture puts modules of its own into the copy (an untraceable
    # part's swapped neurons, a parts capture's graphs).
    modes = {path: m.training for path, m in model.named_modules()}
    before = {id(m) for m in model.modules()}
    own_modes = _own_train_modes(model)
    gm = trace(model, example_inputs, example_kwargs, frontend=frontend, dynamic=dynamic)
    specs = find_sites(gm, include, exclude, model=model)
    not_sites = _layers_not_sites(gm, model)
    every_site = find_sites(gm) if include is not None or exclude is not None else specs
    unmatched = _unmatched_globs(every_site if every_site is not specs else [], include, exclude, list(not_sites),
                                 list(model.modules()))
    if not specs:  # (one line: what no glob matched, else why the first layer is no site, is the likely cause)
        missed = _selected(not_sites, model, include, exclude)
        if missed and not every_site:
            reason = missed[0][1].reason
            if "pbp_frontend_choice" in gm.meta:  # (auto tried torch.export too: its hint is no way out)
                reason = reason.replace(EXPORT_CAPTURES_IT, "")
            raise NoSitesError(f"no Linear/Conv neuron sites in {type(model).__name__}: its {len(missed)} Linear/Conv "
                               f"layer(s) are not sites ({missed[0][0]}: {reason}); "
                               "pbp_fx.explain_sites(model, example_inputs) or pbp-fx transform --explain gives each "
                               "one's reason")
        raise NoSitesError(f"no Linear/Conv neuron sites in {type(model).__name__} "
                           "(or all were excluded): check include=/exclude= (--include/--exclude), or the model has no such layers"
                           + "".join(f"; {u}" for u in unmatched[:1]))
    for u in unmatched:
        warn_at_user(u)
    _warn_not_sites(not_sites, model, include, exclude)
    gm = insert_dendrites(gm, specs, activation=activation, mode=mode)
    keep_out_of_state_dict_on_copy(gm)
    capture = {"frontend": frontend, "captured_with": gm.meta.get("pbp_frontend", "fx"), "dynamic": dynamic,
               "leaves": list(gm.meta.get("pbp_untraceable", [])),
               "inputs": describe_inputs(model, example_inputs, dict(example_kwargs or {})),
               # a graph that follows one mode only follows the mode the model was captured in
               "one_mode": ("train" if model.training else "eval") if gm.meta.get("pbp_modes_reason") else None}
    modes_now = module_modes(model)
    if len(modes_now) > 1:  # (mixed: the graph holds their mode-dependent code as it is; load captures it so again)
        capture["module_modes"] = modes_now
    pm = PerforatedModel(gm, mode=mode, activation=activation, capture=capture, source=model)
    # An exact copy in its modes too: modules that capture and the passes made are in training mode, and
    # code that saves model.training around an evaluation would turn the whole copy to training mode.
    # Each takes the mode of the model's module at its path (a site: its neuron's; one inside the model
    # copy: its path there), else of the nearest module above it (a frozen encoder in eval mode).
    paths = {id(m): path for path, m in pm.graph_module.named_modules()}
    inner = parts_model(pm.graph_module)  # (a parts capture: the model's shallow copy, its parts in place)
    if inner is not None:
        paths.update({id(m): path for path, m in inner.named_modules()})
    for part in pm.graph_module.modules():
        if isinstance(part, TracedPart):  # (a parts capture: each part's graph in the model's own namespace)
            paths.update({id(m): ".".join(filter(None, (part.name, path)))
                          for path, m in [("", part), *part.graph_module.named_modules()]})
    paths.update({id(m): path for path, m in model.named_modules()})
    paths.update({id(site): name for name, site in pm.sites.items()})
    for made in pm.graph_module.modules():
        if id(made) not in before:
            made.training = _mode_at(modes, paths.get(id(made), ""))
    pm.training = model.training
    if own_modes:
        pm.train_overrides = train_overrides(pm, model, own_modes)
    return pm


def _own_train_modes(model: nn.Module) -> dict[bool, dict[str, bool]]:
    """Every module's mode (by path) after `model.train(mode)`, for each mode, when some module's own
    train() leaves a module in the other mode (mmdetection's norm_eval); else {}. The model is left in
    its modes, its parameters' requires_grad flags as they were."""
    if all(type(m).train is nn.Module.train for m in model.modules()):
        return {}
    modes, grads = [(m, m.training) for m in model.modules()], [(p, p.requires_grad) for p in model.parameters()]
    after = {}
    try:
        for mode in (True, False):
            model.train(mode)
            after[mode] = {path: m.training for path, m in model.named_modules()}
    finally:
        for m, training in modes:  # (flags, not train(): that would run the overrides again)
            m.training = training
        for p, flag in grads:
            p.requires_grad_(flag)
    return after if any(t != mode for mode, paths in after.items() for t in paths.values()) else {}


def train_overrides(pm: PerforatedModel, model: nn.Module, own_modes: dict) -> dict:
    """`pm.train_overrides` from `_own_train_modes(model)`: the graph's modules that keep the model's
    (BatchNorms fx keeps whole) take their module's mode, and its mode switches (`ModeSwitch`: batch norm
    and dropout ops under torch.export, `self.training` branches) that of the innermost module that
    ran them (a parts capture's: of its part's path)."""
    from .modes import ModeSwitch

    source = {id(m): path for path, m in model.named_modules()}
    graphs = [("", pm.graph_module)] + [
        (f"{path}.graph_module", part.graph_module) for path, part in pm.graph_module.named_modules(prefix="graph_module")
        if isinstance(part, TracedPart)]
    overrides: dict = {}
    for mode, after in own_modes.items():
        changed = {}
        for path, m in pm.named_modules():
            if id(m) in source and after.get(source[id(m)], mode) != mode:
                changed[path] = after[source[id(m)]]
        for prefix, graph in graphs:
            part = ""
            if prefix:
                part = pm.get_submodule(prefix.rpartition(".")[0]).name
            for node in graph.graph.nodes:
                if node.op != "call_module" or not isinstance(graph.get_submodule(node.target), ModeSwitch):
                    continue
                stack = [p for p, _ in (node.meta.get("nn_module_stack") or {}).values() if p]
                ran_in = ".".join(filter(None, (part, stack[-1] if stack else "")))
                training = _mode_at(after, ran_in)
                if training != mode:
                    changed[".".join(filter(None, (prefix or "graph_module", node.target)))] = training
        if changed:
            overrides[mode] = changed
    return overrides


def _layers_not_sites(gm: fx.GraphModule, model: nn.Module) -> dict:
    """Linear and Conv layers of the model (modules, by path) that are no sites, each with its first
    explain row: a weight computed at run time, a layer the graph does not look into, one the example
    does not reach; and parameters of other modules that a functional Linear/Conv takes as its weight
    computed at run time (F.linear(x, W[:4]), W * mask; by the parameter's path). Layers of a root the
    parts capture could not trace are left out (warned of)."""
    from .explain import COMPUTED, SLICED, UNTRACED, explain_graph

    params = dict(model.named_parameters())
    rows = explain_graph(gm, model)
    sites = {row.name.partition("@")[0] for row in rows if row.status == "site"}  # (a layer called as a site too)
    # (the graph's names; a root child named like a GraphModule attribute has a free one there: meta -> meta_)
    own_name = {new: old for old, new in gm.meta.get("pbp_renamed", {}).items()}

    def in_model(name: str) -> str:
        head, dot, rest = name.partition(".")
        return own_name.get(head, head) + dot + rest

    layers: dict[str, object] = {}
    for row in rows:
        if row.status == "site" or row.reason == UNTRACED or in_model(row.name) not in params:
            continue  # (a graph node or a buffer: no layer the user made, to be named or filtered)
        path = row.name.rpartition(".")[0].partition(".parametrizations.")[0]
        if path in sites:
            continue
        owner = model.get_submodule(in_model(path)) if path else None  # (a parameter's owner: always there)
        if isinstance(owner, (nn.Linear, nn.modules.conv._ConvNd)) and not isinstance(
                owner, nn.modules.conv._ConvTransposeNd):
            layers.setdefault(path, row)
        elif row.reason in (COMPUTED, SLICED) and row.name not in sites:  # (a bare weight that is also a site where taken whole)
            layers.setdefault(row.name, row)
    return layers


def _selected(layers: dict, model: nn.Module, include, exclude) -> list:
    """(path, explain row) of the `_layers_not_sites` that include/exclude select (a parameter's by its owner)."""
    from .passes.find_sites import selected

    modules = dict(model.named_modules())
    return [(path, row) for path, row in layers.items()
            if selected(path, modules.get(path, modules.get(path.rpartition(".")[0])), include, exclude)]


def _warn_not_sites(layers: dict, model: nn.Module, include, exclude) -> None:
    """`_layers_not_sites` but those include/exclude leave out: PB grows nothing there, which the site
    count alone does not show."""
    missed = _selected(layers, model, include, exclude)
    if missed:
        names = ", ".join(path for path, _ in missed[:3]) + (", ..." if len(missed) > 3 else "")
        warn_at_user(f"{len(missed)} Linear/Conv layer(s) of {type(model).__name__} are not sites, so PB adds no "
                     f"dendrites there: {names} ({missed[0][1].name}: {missed[0][1].reason}); "
                     "pbp_fx.explain_sites(model, example_inputs) or pbp-fx transform --explain gives each one's reason")


def module_modes(model: nn.Module) -> dict[str, bool]:
    """The root's mode ("") and each module's whose mode differs from its parent's, parents first: set
    in this order (`set_module_modes`), they give every module its mode (a train-mode dropout inside an
    eval-mode encoder)."""
    modules = dict(model.named_modules())
    modes = {"": model.training}
    for path, module in modules.items():
        if path and module.training != modules[path.rpartition(".")[0]].training:
            modes[path] = module.training
    return modes


def set_module_modes(model: nn.Module, modes: dict[str, bool]) -> None:
    """Set modes recorded by `module_modes`, in their order; paths the model lacks are skipped."""
    modules = dict(model.named_modules())
    for path, training in modes.items():
        if path in modules:
            modules[path].train(training)


def _mode_at(modes: dict[str, bool], path: str) -> bool:
    """The training flag at `path` ("a.b.c"; "name@2": a module's second call) in `modes` (the model's
    modules' flags by path), or at the nearest path above it there."""
    parts = [part.split("@")[0] for part in path.split(".")] if path else []
    for end in range(len(parts), -1, -1):
        found = modes.get(".".join(parts[:end]))
        if found is not None:
            return found
    return modes[""]


def _warn_dropped_checkpointing(model: nn.Module) -> None:
    """Activation checkpointing inside the model (a forward that calls torch.utils.checkpoint, or a
    Hugging Face model's gradient_checkpointing on) is traced through: the captured graph stores
    every activation, silently (6x the saved activations measured on a small CNN)."""
    for name, m in model.named_modules():
        code = getattr(getattr(type(m), "forward", None), "__code__", None)
        if getattr(m, "gradient_checkpointing", False) is True:
            what = f"{name or type(model).__name__} has gradient_checkpointing on"
        elif code is not None and {"checkpoint", "checkpoint_sequential"} & set(code.co_names):
            what = f"{type(m).__name__}.forward refers to torch.utils.checkpoint"
        else:
            continue
        warn_at_user(f"{what}: activation checkpointing inside the model is not kept by the captured graph (it stores "
                     "every activation); if the model checkpoints, call pm.activation_checkpointing_enable() instead")
        return


def _unmatched_globs(specs: list, include, exclude, not_sites: list[str] = (), modules: list = ()) -> list[str]:
    """What to say of each name glob of include/exclude that matches no layer (most likely a typo), and of
    each module type that no module of the model is; `not_sites`: paths of Linear/Conv layers that are no
    sites, which a glob may leave out too."""
    import fnmatch

    from pbp_fx.passes.find_sites import rules

    names = [s.name for s in specs] + list(not_sites)
    said = []
    for which, f in (("include", include), ("exclude", exclude)):
        for rule in rules(f):
            if isinstance(rule, str) and not any(fnmatch.fnmatchcase(n.split("@")[0], rule)
                                                 or fnmatch.fnmatchcase(n, rule) for n in names):
                shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
                said.append(f"{which} pattern {rule!r} matches no Linear/Conv layer (they are named {shown}; "
                            "pbp_fx.explain_sites or pbp-fx transform --explain lists them)")
            elif isinstance(rule, type) and modules and not any(isinstance(m, rule) for m in modules):
                said.append(f"{which} type {rule.__name__} matches no module of the model (pbp_fx.explain_sites "
                            "lists its sites and their layers' types)")
    return said


def _format_where_it_fits(fn: Callable, stacked: set) -> Callable:
    """`fn` (a conversion of `_apply`) for each tensor; where it fails on a memory format for one
    of the `stacked` tensors (ids: `.to(memory_format=torch.channels_last)` reaching a site's
    stacked conv weights, one dim more than the format's), the tensor gets fn's device and dtype
    and keeps its layout. The model's own tensors fail as in torch."""
    def apply(t: torch.Tensor) -> torch.Tensor:
        try:
            return fn(t)
        except RuntimeError as e:
            if "channels_last" not in str(e) or id(t) not in stacked:
                raise
            probe = fn(t.new_empty(0))  # (a 1-D tensor: the format does not apply)
            return t.to(device=probe.device, dtype=probe.dtype)
    return apply


def perforated_path(obj) -> Optional[str]:
    """Python that reaches the PerforatedModel `obj` wraps (torch.compile's OptimizedModule, DDP, a
    module holding it), e.g. "._orig_mod"; None when it holds none, or is one."""
    if isinstance(obj, PerforatedModel) or not isinstance(obj, nn.Module):
        return None
    inside = next((name for name, m in obj.named_modules() if isinstance(m, PerforatedModel)), None)
    return None if inside is None else access_path(obj, inside)


def perforated_inside(obj) -> str:
    """`perforated_path` as advice, e.g. "it wraps a PerforatedModel: pass that (model._orig_mod)"; ""
    when it holds none, or is one."""
    path = perforated_path(obj)
    return "" if path is None else f"it wraps a PerforatedModel: pass that (model{path})"


def access_path(obj: nn.Module, name: str) -> str:
    """Python that reaches submodule `name` of obj: ".encoder[0]['head']" for "encoder.0.head"."""
    out = ""
    for part in name.split("."):
        if isinstance(obj, (nn.Sequential, nn.ModuleList)) and part.isdigit():
            out += f"[{part}]"
        elif isinstance(obj, nn.ModuleDict):
            out += f"[{part!r}]"
        else:
            out += f".{part}"
        obj = obj.get_submodule(part)
    return out


def put_back(module: nn.Module, places: list) -> None:
    """Copy each held value into the tensor `module` holds at its name path ([(["bn", "running_mean"],
    value), ...]), through .data: a forward's saved tensors keep their version (BatchNorm's
    training-mode backward does not read its running statistics). Looked up by name at each call:
    a buffer or module replaced meanwhile (load_state_dict(assign=True), a submodule's .double(), a
    swapped BatchNorm) is held too; a missing or reshaped one is left alone."""
    live = [(_attribute_path(module, path), value) for path, value in places]
    live = [(b, v) for b, v in live if isinstance(b, torch.Tensor) and b.shape == v.shape]
    if live:
        with torch.no_grad():
            torch._foreach_copy_([b.data for b, _ in live], [v for _, v in live])


def _kept_copy(value):
    """A copy of a keyword value to compare later ones with: tensors cloned, containers rebuilt, other objects
    deep-copied where they can be (an options object changed in place is then another value)."""
    def leaf(v):
        if isinstance(v, torch.Tensor):
            return v.detach().clone()
        if v is None or isinstance(v, (bool, int, float, complex, str, bytes, torch.dtype, torch.device)):
            return v
        try:
            return copy.deepcopy(v)
        except Exception:  # noqa: BLE001 - (an object that cannot be copied: compared as it is)
            return v
    return pytree.tree_map(leaf, value)


def _same_value(a, b) -> bool:
    """Whether two keyword values are equal: the same structure, tensors of the same shape, dtype and elements
    (NaN equal to NaN), other leaves equal and of one type."""
    leaves_a, spec_a = pytree.tree_flatten(a)
    leaves_b, spec_b = pytree.tree_flatten(b)
    if spec_a != spec_b:
        return False
    for x, y in zip(leaves_a, leaves_b):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)) or x.shape != y.shape \
                    or x.dtype != y.dtype:
                return False
            y = y.to(x.device)
            same = (torch.isclose(x, y, rtol=0, atol=0, equal_nan=True).all() if x.is_floating_point()
                    else torch.equal(x, y))
            if not bool(same):
                return False
        elif type(x) is not type(y) or not _equal_or_both_nan(x, y):
            return False
    return True


def _equal_or_both_nan(x, y) -> bool:
    try:
        return bool(x == y) or (x != x and y != y)
    except Exception:  # noqa: BLE001 - (a value whose == does not give one bool)
        return False


def _attribute_path(obj, path: list):
    """obj.a.b.c for path ["a", "b", "c"]; None where a step is missing. A module's own submodules, buffers and
    parameters are read from its dicts (through Module.__getattr__ a step took ~1 us, and a dendrite phase puts
    back every held buffer after each forward); anything else (a property, a plain attribute) by getattr."""
    for name in path:
        if isinstance(obj, nn.Module):  # (`in` and [], not .get: a TorchScript module's dicts have no .get)
            modules, buffers, params = obj._modules, obj._buffers, obj._parameters
            found = (modules[name] if name in modules else buffers[name] if name in buffers
                     else params[name] if name in params else None)
            obj = found if found is not None else getattr(obj, name, None)
        else:
            obj = getattr(obj, name, None)
        if obj is None:
            return None
    return obj


def _with_signature(signature: inspect.Signature) -> type:
    """A PerforatedModel class whose `forward` shows the original model's signature.

    Frameworks read it from the class to decide what to pass: the Hugging Face Trainer takes
    its label names and the dataset columns it keeps from `forward`'s parameters, so
    `(*args, **kwargs)` would make it drop the inputs."""
    def forward(self, *args, **kwargs):
        return PerforatedModel.forward(self, *args, **kwargs)

    this = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)  # (before a `/` of the original's)
    forward.__signature__ = signature.replace(parameters=[this, *signature.parameters.values()])
    forward.__doc__ = PerforatedModel.forward.__doc__
    forward.__qualname__ = "PerforatedModel.forward"
    return type("PerforatedModel", (PerforatedModel,), {"forward": forward, "__module__": __name__})


def _pool_left_out(pm: "PerforatedModel", incompatible) -> None:
    """load_state_dict's post-hook: a state saved inside a dendrite phase (a Lightning .ckpt) loaded
    into a model outside one (`load_from_checkpoint` on a fresh module) holds the candidate pool's
    tensors, which have no place there; they add nothing to the output, so they are left out with a
    warning (strict loads refused them in torch's many-line report)."""
    if pm.phase == "dendrite":
        return
    paths = [f"{path}.candidates." for path, m in pm.named_modules() if isinstance(m, Site)]
    pool = [k for k in incompatible.unexpected_keys if any(p in k for p in paths)]
    if not pool:
        return
    for key in pool:
        incompatible.unexpected_keys.remove(key)
    warn_at_user(f"the state was saved inside a dendrite phase: its candidate pool ({len(pool)} tensors) is left "
                 "out, as it adds nothing to the output; to train on from it, resume the run itself "
                 "(Lightning: trainer.fit(..., ckpt_path=...) with the PBCallback in the Trainer's callbacks; Hugging "
                 "Face: trainer.train(resume_from_checkpoint=...) with its PBCallback; pbp_fx.load; pbp-fx train "
                 "--resume)")


def _fx_constants_left_out(pm: "PerforatedModel", incompatible) -> None:
    """load_state_dict's post-hook: fx's tensor constants, which states saved before they were kept
    out of the state dict hold, are left out where the model holds them out of its own (the graph
    holds its own values)."""
    held_out = {f"{path}.{name}" if path else name for path, m in pm.named_modules()
                for name in m._non_persistent_buffers_set if FX_CONSTANT.fullmatch(name)}
    for key in [k for k in incompatible.unexpected_keys if k in held_out]:
        incompatible.unexpected_keys.remove(key)


def _new_with_signature(signature: inspect.Signature) -> PerforatedModel:
    """Unpickling: an empty model of the class `_with_signature` makes (state follows)."""
    return nn.Module.__new__(_with_signature(signature))



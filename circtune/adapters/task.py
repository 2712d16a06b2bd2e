"""Task models: where a config's layer names live in a model, what task it does and which head it trains.

A config written for a base model (``encoder.layer.0.attention.self.query``, as ``circtune search`` writes) also
fits a task model built on that base, whose names carry one prefix (``roberta.encoder.layer.0...`` in
``RobertaForSequenceClassification``, ``model.layers.0...`` in ``LlamaForCausalLM``). :func:`resolve_prefix` finds
that prefix once for the whole config, or says why there is none.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from torch import nn

# Class-name suffix -> (PEFT task_type, names of the task head that PEFT's task model trains by default).
# The heads are those PEFT's PeftModelFor<Task> adds to ``modules_to_save``; a causal LM trains no head.
_TASKS = (
    ("ForSequenceClassification", "SEQ_CLS", ("classifier", "score")),
    ("ForTokenClassification", "TOKEN_CLS", ("classifier", "score")),
    ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)),
    ("ForCausalLM", "CAUSAL_LM", ()),
)


def is_base_model(model: nn.Module) -> bool:
    """A transformers base model (``AutoModel``: ``RobertaModel``, ``LlamaModel``), not a task model around one."""
    return getattr(model, "base_model_prefix", None) is not None and getattr(model, "base_model", None) is model


def task_type(model: nn.Module) -> str | None:
    """PEFT's ``task_type`` for ``model``: from its class name for a task model, ``FEATURE_EXTRACTION`` for a
    transformers base model, else None (a model circtune cannot classify)."""
    name = type(model).__name__
    for suffix, task, _ in _TASKS:
        if name.endswith(suffix):
            return task
    return "FEATURE_EXTRACTION" if is_base_model(model) else None


def default_heads(model: nn.Module) -> tuple[str, ...]:
    """The task head(s) trained with the adapter unless told otherwise: as PEFT's task models do, the top-level
    ``classifier`` or ``score`` of a sequence or token classifier, ``qa_outputs`` of a question-answering model,
    nothing for a causal LM, a base model or any other model."""
    name = type(model).__name__
    children = dict(model.named_children())
    for suffix, _, heads in _TASKS:
        if name.endswith(suffix):
            return tuple(h for h in heads if h in children)
    return ()


@dataclass(frozen=True)
class Resolution:
    """Where a set of names lives in a model: ``prefix + name`` for each, and what was tried."""

    prefix: str | None  # None when no single prefix holds every name
    tried: tuple[str, ...]
    missing: tuple[str, ...] = ()  # under the best prefix tried (most names found; the empty one on ties)
    best: str = ""
    ambiguous: tuple[str, ...] = ()  # several non-empty prefixes hold every name

    def problem(self, model: nn.Module, modules: Mapping[str, nn.Module]) -> str:
        """One line: why ``self.prefix`` is None."""
        cls = type(model).__name__
        if self.ambiguous:
            listed = ", ".join(map(repr, self.ambiguous))
            return (f"the config's layer names are found under several prefixes of {cls} ({listed}); apply it to "
                    f"the submodule you mean (e.g. model.{self.ambiguous[0].rstrip('.')})")
        first = self.missing[0]
        near = difflib.get_close_matches(self.best + first, [n for n, m in modules.items()
                                                             if isinstance(m, nn.Linear)], 1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        more = f"nor {len(self.missing) - 1} more of the config's layers; " if len(self.missing) > 1 else ""
        shown = ", ".join(map(repr, self.tried[:4]))
        tried = shown + (f", ... ({len(self.tried)} in all)" if len(self.tried) > 4 else "")
        return f"layers[{first!r}]: {cls} has no module of that name{hint} ({more}prefixes tried: {tried})"


def resolve_prefix(names: Iterable[str], modules: Mapping[str, nn.Module]) -> Resolution:
    """The one prefix under which every name is a module: the empty prefix if it fits, else the single prefix
    ``P`` (e.g. ``"roberta."``) such that ``P + name`` is a module for every name. Candidates come from the modules
    whose names end with ``"." + name``."""
    names = list(names)
    candidates = {"": None}
    for module in modules:
        for name in names:
            if module.endswith("." + name):
                candidates.setdefault(module[:len(module) - len(name)], None)
    found = {p: sum(p + n in modules for n in names) for p in candidates}
    complete = [p for p in candidates if found[p] == len(names)]
    tried = tuple(candidates)
    if "" in complete:
        return Resolution("", tried)
    if len(complete) == 1:
        return Resolution(complete[0], tried)
    if complete:
        return Resolution(None, tried, ambiguous=tuple(complete))
    best = max(candidates, key=lambda p: found[p])  # the first (empty) prefix wins ties
    return Resolution(None, tried, tuple(n for n in names if best + n not in modules), best)

"""Calibration: the frozen target layers' full-weight gradients on a few texts, for the capacity scores.

``calibration_gradients`` reads a text file (one text per line), loads a local model folder with its weights
(``model.safetensors`` only: pickled checkpoints are refused), tokenises the texts with the folder's tokenizer and
returns, per target ``nn.Linear``, ``G = Σ_tokens g xᵀ`` (the weight's gradient of the summed loss), accumulated
batch by batch in float64 on the CPU. :mod:`circtune.capacity` turns these into scores.

The loss, when the caller gives none (:func:`default_loss`), follows the model's head:

* a causal LM head (``*ForCausalLM``, ``*LMHeadModel``): next-token cross-entropy, padding excluded;
* a masked LM head (``*ForMaskedLM``): 15 % of the non-special tokens of each text (at least one) are chosen with a
  seeded generator and replaced by the mask token (a random token when the mask token is unknown); cross-entropy
  on those positions;
* any other head with logits (classification, token classification, ...): cross-entropy against labels sampled
  from the model's own predictive distribution (seeded) — the Fisher-style choice, since calibration texts carry
  no labels (a one-logit regression head: a Gaussian sample around its output, squared error);
* a bare encoder (no head, no logits): half the squared norm of the last hidden state over real tokens. This is a
  weak proxy: it says which directions move the representation, not which ones a task needs.

Every loss is a sum over tokens (or examples), so each calibration token weighs the same whatever its batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import OptionError

LossFn = Callable[[nn.Module, Mapping[str, torch.Tensor]], torch.Tensor]

_ACCEPTED = "a UTF-8 text file with one calibration text per line"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model")
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_MASK_SHARE = 0.15
_SEED = 0


class CalibrationError(OptionError):
    """A calibration file or model folder that cannot be used: one line naming it and what is accepted."""

    def __init__(self, message: str, option: str = "calibration"):
        super().__init__(option, message)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def read_texts(path: str | Path) -> list[str]:
    """The calibration texts: one per line, surrounding whitespace removed, blank lines skipped. Refuses a missing
    path, a folder, a binary file (NUL bytes), one that is not UTF-8 (says where) and one with no text."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CalibrationError(f"calibration file {str(path)!r} does not exist; --calibration needs {_ACCEPTED}")
    if path.is_dir():
        raise CalibrationError(f"calibration file {str(path)!r} is a folder; --calibration needs {_ACCEPTED}")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {str(path)!r}: {e.strerror or e}") from None
    nul = data.find(b"\x00")
    if nul >= 0:
        raise CalibrationError(f"calibration file {str(path)!r} is binary (a NUL byte at offset {nul}); "
                               f"--calibration needs {_ACCEPTED}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start + (3 if data.startswith(b"\xef\xbb\xbf") else 0)
        line = data[:offset].count(b"\n") + 1
        raise CalibrationError(f"calibration file {str(path)!r} is not UTF-8 (byte 0x{data[offset]:02x} at offset "
                               f"{offset}, line {line}); --calibration needs {_ACCEPTED}") from None
    texts = [line.strip() for line in text.splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise CalibrationError(f"calibration file {str(path)!r} holds no text (it is empty or only blank lines); "
                               f"--calibration needs {_ACCEPTED}")
    return texts


def _model_class(config) -> type:
    """The transformers class the folder's ``config.architectures`` names, when transformers has it; else
    AutoModel's class for the config (a bare model)."""
    import transformers

    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, str(name), None)
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel


def _weight_files(folder: Path) -> None:
    """Refuse a folder without safetensors weights (and say why a pickle is not used)."""
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        return
    if any((folder / n).is_file() for n in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise CalibrationError(f"model folder {str(folder)!r} holds its weights as pytorch_model.bin (a pickle, which "
                               "circtune never loads: it can run code); --calibration needs model.safetensors "
                               "(convert it, e.g. save_pretrained(..., safe_serialization=True))", option="model")
    raise CalibrationError(f"model folder {str(folder)!r} holds no model.safetensors; --calibration needs the "
                           "model's weights there (the profiler alone needs only config.json)", option="model")


def check_model_folder(folder: str | Path) -> Path:
    """The cheap checks on a calibration model folder, before anything is loaded: it exists, has config.json, a
    tokenizer and safetensors weights. Returns the folder."""
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CalibrationError(f"--calibration needs --model to be a local model folder (config.json, tokenizer "
                               f"and model.safetensors); {str(folder)!r} is not a folder", option="model")
    if not (path / "config.json").is_file():
        raise CalibrationError(f"model folder {str(path)!r} holds no config.json; --calibration needs config.json, "
                               "tokenizer files and model.safetensors", option="model")
    if not any((path / n).is_file() for n in _TOKENIZER_FILES):
        raise CalibrationError(f"model folder {str(path)!r} holds no tokenizer files ({', '.join(_TOKENIZER_FILES[:4])}"
                               ", ...); --calibration tokenises the texts with the folder's tokenizer", option="model")
    _weight_files(path)
    return path


def load_model_folder(folder: str | Path, *, device: torch.device | str = "cpu",
                      dtype: torch.dtype | None = None) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` from a local folder, nothing downloaded: the tokenizer by
    ``AutoTokenizer.from_pretrained(local_files_only=True)``, the model class named by ``config.architectures``
    (AutoModel when transformers has none of them), its weights from ``model.safetensors`` (sharded safetensors
    too; never a pickle). Every parameter must come from the file: missing or unexpected keys are refused."""
    from transformers import AutoTokenizer

    from .models import _folder_config

    path = check_model_folder(folder)
    try:
        config = _folder_config(str(path))
    except ValueError as e:
        raise CalibrationError(str(e), option="model") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many kinds here; say which folder and why
        raise CalibrationError(f"cannot load the tokenizer of model folder {str(path)!r}: "
                               f"{type(e).__name__}: {_one_line(e)}", option="model") from None
    cls = _model_class(config)
    kwargs: dict[str, Any] = {"config": config, "local_files_only": True, "use_safetensors": True,
                              "output_loading_info": True}
    if dtype is not None:
        import transformers

        kwargs["dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"] = dtype
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load would interleave with circtune's own
    try:
        model, info = cls.from_pretrained(str(path), **kwargs)
    except Exception as e:
        raise CalibrationError(f"cannot load the weights of model folder {str(path)!r} into {cls.__name__}: "
                               f"{type(e).__name__}: {_one_line(e)}", option="model") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        keys = sorted(str(k) for k in info.get(kind) or ())
        if keys:
            shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
            problems.append(f"{len(keys)} {kind.replace('_', ' ')} ({shown})")
    if problems:
        raise CalibrationError(f"model.safetensors in {str(path)!r} does not match {cls.__name__} (from "
                               f"config.architectures): {'; '.join(problems)}", option="model")
    return model.to(device), tokenizer


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ---------------------------------------------------------------------------------------------------------------
# Gradients


def _head_kind(model: nn.Module) -> str:
    name = type(model).__name__
    if name.endswith("ForCausalLM") or name.endswith("LMHeadModel"):
        return "causal"
    if name.endswith("ForMaskedLM"):
        return "masked"
    return "other"


def default_loss(model: nn.Module, *, mask_token_id: int | None = None, seed: int = _SEED) -> LossFn:
    """The loss rule of the module docstring for ``model``'s head, seeded (the masks and sampled labels are the
    same on every call with the same batches)."""
    gen = torch.Generator().manual_seed(seed)
    kind = _head_kind(model)

    def loss(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k in _MODEL_INPUTS}
        ids = inputs["input_ids"]
        real = inputs.get("attention_mask", torch.ones_like(ids)).bool()
        if kind == "causal":
            logits = model(**inputs).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(~real[:, 1:], -100)
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        if kind == "masked":
            eligible = real.clone()
            if "special_tokens_mask" in batch:
                eligible &= ~batch["special_tokens_mask"].bool()
            score = torch.rand(ids.shape, generator=gen).to(ids.device).masked_fill(~eligible, -1.0)
            count = (eligible.sum(dim=1).float() * _MASK_SHARE).ceil().clamp_min(1).long()
            order = score.argsort(dim=1, descending=True).argsort(dim=1)  # rank of each position in its row
            chosen = (order < count.unsqueeze(1)) & eligible
            vocab = model.get_output_embeddings().weight.shape[0]
            if mask_token_id is not None:
                replacement = torch.full_like(ids, int(mask_token_id))
            else:
                replacement = torch.randint(vocab, ids.shape, generator=gen).to(ids.device)
            logits = model(**{**inputs, "input_ids": torch.where(chosen, replacement, ids)}).logits.float()
            labels = ids.masked_fill(~chosen, -100)
            return F.cross_entropy(logits.reshape(-1, vocab), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum")
        out = model(**inputs)
        logits = getattr(out, "logits", None)
        if logits is None:
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            if hidden.dim() == 3 and hidden.shape[:2] == ids.shape:
                hidden = hidden * real.unsqueeze(-1)
            return 0.5 * hidden.float().square().sum()
        logits = logits.float()
        if logits.dim() == 3 and logits.shape[:2] == ids.shape:  # per token: real tokens only
            logits = logits[real]
        logits = logits.reshape(-1, logits.shape[-1])
        if logits.shape[-1] == 1:  # regression: y ~ N(output, 1), squared error
            target = logits.detach() + torch.randn(logits.shape, generator=gen).to(logits.device)
            return 0.5 * (logits - target).square().sum()
        probs = logits.detach().softmax(dim=-1).cpu().double()
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(1).to(logits.device)
        return F.cross_entropy(logits, sampled, reduction="sum")

    loss.kind = kind  # type: ignore[attr-defined]
    return loss


LOSS_RULES = {"causal": "next-token cross-entropy (causal LM head)",
              "masked": "masked-token cross-entropy, 15% of tokens masked, seeded (masked LM head)",
              "other": "cross-entropy against labels sampled from the model's own predictions (Fisher-style), or "
                       "the last hidden state's squared norm for a bare encoder (a weak proxy)"}


def resolve_targets(model: nn.Module, target_names: Sequence[str]) -> dict[str, nn.Linear]:
    """Each target name's ``nn.Linear`` in ``model``: the exact module name, or the name under the model's base
    prefix (targets are named on the bare model, a head model holds it as e.g. ``roberta.``), or the one module
    whose name ends with ``.name``."""
    modules = dict(model.named_modules())
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, nn.Linear] = {}
    for name in target_names:
        module = modules.get(name)
        if module is None and prefix:
            module = modules.get(f"{prefix}.{name}")
        if module is None:
            ends = [m for n, m in modules.items() if n.endswith("." + name)]
            module = ends[0] if len(ends) == 1 else None
        if not isinstance(module, nn.Linear):
            what = "is not in the model" if module is None else f"is a {type(module).__name__}, not an nn.Linear"
            raise ValueError(f"calibration target {name!r} {what} ({type(model).__name__})")
        found[name] = module
    return found


def layer_gradients(model: nn.Module, target_names: Sequence[str], batches: Iterable[Mapping[str, torch.Tensor]],
                    loss_fn: LossFn | None = None, *, progress: bool = False) -> dict[str, torch.Tensor]:
    """``G = Σ_tokens g xᵀ`` per target ``nn.Linear`` (``[d_out, d_in]``, float64, CPU): the weight gradient of the
    loss summed over ``batches``. Only the target weights require grad while this runs (so nothing else is
    computed or stored for the backward), the model is in eval mode (no dropout), and each batch's gradient is
    added to a float64 accumulator and freed: nothing per token is kept. ``loss_fn(model, batch)`` defaults to
    :func:`default_loss`. Every flag (requires_grad, training) and every parameter's ``.grad`` are put back
    afterwards, also on an error."""
    from tqdm.auto import tqdm

    targets = resolve_targets(model, target_names)
    loss_fn = loss_fn or default_loss(model)
    flags = {p: (p.requires_grad, p.grad) for p in model.parameters()}
    training = model.training
    device = next(iter(targets.values())).weight.device
    acc = {n: torch.zeros(m.out_features, m.in_features, dtype=torch.float64) for n, m in targets.items()}
    seen = 0
    try:
        model.eval()
        for p in flags:
            p.requires_grad_(False)
            p.grad = None  # the caller's gradients are put back afterwards
        for m in targets.values():
            m.weight.requires_grad_(True)
        total = len(batches) if hasattr(batches, "__len__") else None
        for batch in tqdm(batches, total=total, desc="calibration gradients", unit="batch", disable=not progress):
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            with torch.enable_grad():  # also when the caller runs under no_grad
                loss = loss_fn(model, batch)
            if not torch.isfinite(loss):
                raise ValueError(f"calibration loss is not finite ({float(loss)}) on batch {seen + 1}")
            loss.backward()
            for name, m in targets.items():
                if m.weight.grad is not None:
                    acc[name] += m.weight.grad.detach().to(device="cpu", dtype=torch.float64)
                    m.weight.grad = None
            seen += 1
    finally:
        for p, (flag, grad) in flags.items():
            p.requires_grad_(flag)
            p.grad = grad
        model.train(training)
    if seen == 0:
        raise ValueError("no calibration batches: layer gradients need at least one batch")
    return acc


# ---------------------------------------------------------------------------------------------------------------
# From files


def _model_positions(model: nn.Module) -> int | None:
    """How many tokens the model's position embeddings hold: ``max_position_embeddings`` (``n_positions``), less
    the offset of RoBERTa-style embeddings whose positions start after the padding index."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if not isinstance(limit, int) or limit <= 0:
        return None
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return max(1, module.num_embeddings - module.padding_idx - 1)
    return limit


def calibration_gradients(folder: str | Path, texts_path: str | Path, target_names: Sequence[str], *,
                          batch_size: int = 8, max_length: int | None = None, device: torch.device | str = "cpu",
                          dtype: torch.dtype | None = None, progress: bool = False
                          ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The target layers' gradients on the texts of ``texts_path`` through the model in ``folder``:
    ``(gradients, notes)``. The cheapest checks come first (the texts file, then the folder's files, then the
    loading). Texts longer than ``max_length`` or the model's positions are truncated, and a note says how many."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise CalibrationError(f"calibration batch size must be a whole number >= 1, got {batch_size!r}")
    texts = read_texts(texts_path)
    check_model_folder(folder)
    model, tokenizer = load_model_folder(folder, device=device, dtype=dtype)
    positions = _model_positions(model)
    limits = [(positions, "the model's positions")] if positions else []
    if max_length is not None:
        limits.append((int(max_length), "the requested max length"))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limits.append((tok_limit, "the tokenizer's model_max_length"))
    length, reason = min(limits) if limits else (None, "")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:  # e.g. GPT-2: pad with EOS; the attention mask hides it
            tokenizer.pad_token = tokenizer.eos_token
        else:
            batch_size = 1  # nothing to pad with: one text per batch
    notes: list[str] = []
    if length is not None:
        lengths = [len(ids) for ids in tokenizer(texts, truncation=False)["input_ids"]]
        cut = sum(n > length for n in lengths)
        if cut:
            notes.append(f"{cut} of {len(texts)} texts truncated to {length} tokens ({reason})")
    batches = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], truncation=length is not None, max_length=length,
                        padding=True, return_tensors="pt", return_special_tokens_mask=True)
        batches.append(dict(enc))
    loss = default_loss(model, mask_token_id=getattr(tokenizer, "mask_token_id", None))
    gradients = layer_gradients(model, target_names, batches, loss, progress=progress)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    notes.append(f"{len(texts)} texts ({tokens} tokens, {len(batches)} batch{'es' if len(batches) > 1 else ''}) "
                 f"through {type(model).__name__}; loss: {LOSS_RULES[loss.kind]}")
    return gradients, notes


def describe(path: str | Path) -> dict[str, Any]:
    """What a run records about its calibration file (for adapter_config.json metadata)."""
    path = Path(path).expanduser()
    return {"file": str(path), "texts": len(read_texts(path))}


__all__ = ["CalibrationError", "LOSS_RULES", "calibration_gradients", "check_model_folder", "default_loss",
           "describe", "layer_gradients", "load_model_folder", "read_texts", "resolve_targets"]

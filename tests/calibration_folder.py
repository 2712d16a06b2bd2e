"""A local model folder for calibration tests, made offline: a tiny RoBERTa masked LM (random weights, saved as
model.safetensors), a word-level tokenizer built with `tokenizers`, and a texts file.

The second layer's attention output projection is scaled up, so the gradient reaching that layer's ``value`` (and
``query``) is much larger than the first layer's: the layers' gradient energies are clearly unequal, and a
capacity-aware allocation has something to follow.
"""

from __future__ import annotations

from pathlib import Path

WORDS = ("the cat dog sat on mat a red blue green small large house tree river runs jumps sleeps under over near "
         "far quick slow bird fish").split()
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: bos 0, pad 1, eos 2


def make_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL + list(WORDS))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    fast.save_pretrained(folder)
    return fast


def make_calibration_folder(tmp_path, *, positions: int = 16, hidden: int = 64, layers: int = 2,
                            texts: int = 12, seed: int = 0) -> tuple[Path, Path]:
    """``(folder, texts_file)`` under ``tmp_path``: the model folder (config.json, tokenizer files,
    model.safetensors of a RobertaForMaskedLM with ``layers`` layers of width ``hidden``, ``positions`` tokens) and
    a file of ``texts`` lines, a third of them longer than the positions (they are truncated)."""
    import torch
    from transformers import RobertaConfig, RobertaForMaskedLM

    folder = Path(tmp_path) / "tiny-roberta-mlm"
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    config = RobertaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=max(1, hidden // 16), intermediate_size=2 * hidden,
                           max_position_embeddings=positions + 2, type_vocab_size=1, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, architectures=["RobertaForMaskedLM"])
    torch.manual_seed(seed)
    model = RobertaForMaskedLM(config).eval()
    with torch.no_grad():
        model.roberta.encoder.layer[layers - 1].attention.output.dense.weight.mul_(3.0)
    model.save_pretrained(folder, safe_serialization=True)
    gen = torch.Generator().manual_seed(seed)
    lines = []
    for i in range(texts):
        n = positions + 6 if i % 3 == 0 else 4 + i % 7  # every third line is longer than the positions
        lines.append(" ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (n,), generator=gen)))
    texts_file = Path(tmp_path) / "calibration.txt"
    texts_file.write_text("\n".join(lines[:texts // 2]) + "\n\n  \n" + "\n".join(lines[texts // 2:]) + "\n",
                          encoding="utf-8")
    return folder, texts_file

"""Textual-inversion tokens: one new token per condition, initialised from a word, stored in the diffusers
textual-inversion format so that plain `pipe.load_textual_inversion(file)` loads them.

On disk: one `<name>.safetensors` file per token holding a single tensor keyed by the token string, shape
[1, hidden] (the layout diffusers' loader reads as "diffusers format").
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from magic_align.diffusion.quiet import MEAN_RESIZING, without_log_messages
from magic_align.run import atomic_path


def token_file_name(token: str) -> str:
    """A file name for a token such as `<xxxacnxxx>`: letters, digits, dash and underscore only."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", token).strip("_") or "token"
    return f"{stem}.safetensors"


def add_tokens(tokenizer, text_encoder, tokens: list[str], init_word: str = "skin") -> list[int]:
    """Add `tokens` to the tokenizer, each with the embedding of `init_word` (the mean of its pieces when the word
    splits into several tokens), and return their ids. A token that already exists is an error: silently reusing it
    would train an unrelated word."""
    existing = [token for token in tokens if token in tokenizer.get_vocab()]
    if existing:
        raise ValueError(f"textual-inversion token(s) {existing} already exist in the tokenizer; choose new token names")
    init_ids = tokenizer(init_word, add_special_tokens=False).input_ids
    if not init_ids:
        raise ValueError(f"textual-inversion init word {init_word!r} gives no tokens")
    added = tokenizer.add_tokens(list(tokens))
    if added != len(tokens):
        raise ValueError(f"the tokenizer added {added} of {len(tokens)} tokens {tokens}: are some duplicated?")
    # mean_resizing=False: transformers' default draws the new rows from the old embeddings' distribution (and says
    # so); they are set from the init word just below anyway
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    embeddings = text_encoder.get_input_embeddings().weight
    token_ids = tokenizer.convert_tokens_to_ids(list(tokens))
    with torch.no_grad():
        initial = embeddings[init_ids].mean(dim=0)
        for token_id in token_ids:
            embeddings[token_id] = initial
    return token_ids


def token_embeddings(tokenizer, text_encoder, tokens: list[str]) -> dict[str, torch.Tensor]:
    """{token: embedding [1, hidden]} as float32 CPU tensors."""
    embeddings = text_encoder.get_input_embeddings().weight
    result = {}
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise KeyError(f"token {token!r} is not in the tokenizer")
        result[token] = embeddings[token_id].detach().to("cpu", torch.float32).reshape(1, -1).clone()
    return result


def save_tokens(tokenizer, text_encoder, tokens: list[str], folder: Path) -> list[Path]:
    """Write one diffusers textual-inversion file per token into `folder`; returns the files."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for token, embedding in token_embeddings(tokenizer, text_encoder, tokens).items():
        target = folder / token_file_name(token)
        with atomic_path(target) as temporary:
            save_file({token: embedding}, str(temporary))
        files.append(target)
    return files


def load_tokens(pipe, folder: Path) -> list[str]:
    """Load every token file in `folder` into the pipeline (tokens already present are skipped); returns the tokens."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no textual-inversion files (*.safetensors) in {folder}")
    tokens = []
    vocab = pipe.tokenizer.get_vocab()
    to_load, to_load_tokens = [], []
    for path in files:
        state = load_file(str(path))
        if len(state) != 1:
            raise ValueError(f"{path}: a textual-inversion file holds one tensor keyed by its token; found keys {list(state)}")
        token, embedding = next(iter(state.items()))
        tokens.append(token)
        if token not in vocab:
            to_load.append({token: embedding})
            to_load_tokens.append(token)
    if to_load:
        # diffusers resizes the embeddings with transformers' mean-resizing default, which says so; the new rows
        # are overwritten by the loaded embeddings right after
        with without_log_messages("transformers.modeling_utils", MEAN_RESIZING):
            pipe.load_textual_inversion(to_load, token=to_load_tokens)
    return tokens

"""Loading Hugging Face tokenizers, and the host-side edges of a rollout: prompts in, completions out.

Pad vs EOS. Many base models (Llama, Qwen) ship with `pad_token == eos_token`,
or with no pad at all. Anything that recovers a mask from `tokens != pad_id`,
or that drops padding before a loss, would then also drop the EOS the policy
must learn to emit. So `load_tokenizer` always gives a pad id that differs
from every EOS id: an existing unused pad/reserved special token when the
tokenizer has one (e.g. Qwen's `<|fim_pad|>`, Llama 3.1's `<|finetune_right_pad_id|>`), else a new `<pad>`
added after the last id, which the model's embedding table must cover
(`TokenizerInfo.pad_added`; checked against `vocab_size` when given). With
pad distinct, EOS is never masked out of training. Masks are still returned
explicitly everywhere; nothing in this package infers them from pad ids.

    tok = load_tokenizer("tiny")
    batch = encode_prompts(tok, ["72+4=", "0+8="], max_length=8)
    texts = decode_completions(tok, completion_tokens, completion_mask)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import json
import logging
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NamedTuple

import numpy as np

from jaxrl_llm.errors import ModelError, ModelNotFoundError

log = logging.getLogger(__name__)

TINY = "tiny"
# Files from which AutoTokenizer can build a tokenizer without a hub download.
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_INFO_ATTR = "_jaxrl_llm_tokenizer_info"
# Names of special tokens that are safe to pad with, best first. Role/turn markers
# (<|im_start|>, <|start_header_id|>, ...) and BOS are never candidates.
_PAD_NAME = re.compile(r"pad", re.IGNORECASE)
_MEDIA_NAME = re.compile(r"image|video|vision|audio", re.IGNORECASE)  # <|image_pad|> etc. fill real inputs
_RESERVED_NAME = re.compile(r"reserved|unused", re.IGNORECASE)
_FREE_NAMES = ("<|endoftext|>",)


@dataclasses.dataclass(frozen=True)
class TokenizerInfo:
    """What the rest of the package needs to know about a loaded tokenizer.

    pad_id: never equal to any of `eos_ids`.
    eos_ids: tokenizer.eos_token_id first, then generation_config.json's extra ids.
    vocab_size: len(tokenizer), i.e. including added tokens; the model's
      embedding may be larger (padded), never smaller.
    pad_added: a new `<pad>` token was appended (id = old len(tokenizer)); the
      model's embedding table must have a row for it.
    """

    pad_id: int
    eos_ids: tuple[int, ...]
    vocab_size: int
    pad_added: bool = False


class EncodedPrompts(NamedTuple):
    tokens: np.ndarray  # int32 [B, max_length], left-padded with pad_id
    mask: np.ndarray  # bool [B, max_length], True on real tokens
    num_truncated: int  # prompts that lost tokens on the left


def tiny_tokenizer_dir() -> pathlib.Path:
    """The shipped benchmark tokenizer (written by `python -m jaxrl_llm.assets.train_tiny_tokenizer`)."""
    return pathlib.Path(str(importlib.resources.files("jaxrl_llm") / "assets" / "tiny_tokenizer"))


def _resolve(path_or_name: str | pathlib.Path) -> pathlib.Path:
    path = tiny_tokenizer_dir() if str(path_or_name) == TINY else pathlib.Path(path_or_name).expanduser()
    if is_gguf_path(path) and not path.is_dir():
        return _gguf_file(path)
    expected = (
        f"expected {TINY!r}, a .gguf file or a local directory holding one of {', '.join(_TOKENIZER_FILES)} "
        "(e.g. a downloaded model or tokenizer directory; hub names are not fetched)"
    )
    if not path.is_dir():
        raise ModelNotFoundError(f"tokenizer directory {str(path)!r} does not exist or is not a directory; {expected}")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        found = sorted(p.name for p in path.iterdir())[:20]
        raise ModelNotFoundError(f"no tokenizer files in {str(path)!r} (found: {found}); {expected}")
    return path


# ----------------------------------------------------------------------- GGUF files
#
# A GGUF file (llama.cpp) stores its tokenizer as metadata: the vocabulary, the merges, each token's type and
# the special ids, plus the chat template. Byte-level BPE ("gpt2", what Llama 3, Qwen2/3 and SmolLM use) is
# rebuilt here with `tokenizers`; how the text is split before BPE (`tokenizer.ggml.pre`) follows llama.cpp.

GGUF_SUFFIX = ".gguf"
_GPT2_SPLIT = None  # ByteLevel's own regex: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre -> (split regex before byte-level BPE (None: GPT-2's), digits one by one first, ignore_merges)
_GGUF_PRE: dict[str, tuple[str | None, bool, bool]] = {
    "default": (_GPT2_SPLIT, False, False), "gpt-2": (_GPT2_SPLIT, False, False),
    **{name: (_GPT2_SPLIT, True, False) for name in
       ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")},
    **{name: (_LLAMA3_SPLIT, False, True) for name in
       ("llama-bpe", "llama3", "llama-v3", "smaug-bpe", "falcon3", "dbrx")},
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen")},
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def is_gguf_path(path: str | pathlib.Path) -> bool:
    """The path names a GGUF file (by its suffix; whether it exists is checked where it is read)."""
    return pathlib.Path(path).suffix == GGUF_SUFFIX


def _gguf_file(path: pathlib.Path) -> pathlib.Path:
    if not path.is_file():
        raise ModelNotFoundError(f"GGUF file {str(path)!r} does not exist; give the path of a local .gguf file")
    return path


def read_gguf_metadata(path: str | pathlib.Path) -> tuple[Any, dict[str, Any]]:
    """(gguf.GGUFReader, metadata key -> value) of a .gguf file; a file that is not one is a ModelError.

    Parsing the metadata takes seconds (the vocabulary is one field per token), and one load reads it for
    the config, the weights and the tokenizer: the last two files read are kept (the tensors stay memory-mapped,
    not read), until the file changes.
    """
    path = _gguf_file(pathlib.Path(path)).resolve()
    stat = path.stat()
    return _read_gguf_metadata(path, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _read_gguf_metadata(path: pathlib.Path, mtime_ns: int, size: int) -> tuple[Any, dict[str, Any]]:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError(f"reading {str(path)!r} needs the 'gguf' package: pip install 'gguf>=0.17'") from None
    try:
        reader = GGUFReader(str(path))
        return reader, {key: field.contents() for key, field in reader.fields.items()}
    except Exception as e:  # gguf raises ValueError/struct errors/IndexError for a bad file
        raise ModelError(f"{path}: not a readable GGUF file ({type(e).__name__}: {str(e)[:200]}); it is truncated "
                         "or not a GGUF file: copy or download it again") from None


def gguf_tokenizer(path: str | pathlib.Path):
    """The tokenizer stored in a .gguf file's metadata, as a transformers fast tokenizer (chat template included).

    Only byte-level BPE (`tokenizer.ggml.model` "gpt2") is rebuilt; control tokens become special tokens and
    user-defined ones added tokens, as llama.cpp treats them. The pad token is the file's own (often EOS):
    `load_tokenizer(path)` then picks a distinct one. Torch is not needed.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    path = pathlib.Path(path)
    _, meta = read_gguf_metadata(path)
    kind = meta.get("tokenizer.ggml.model")
    if kind is None:
        raise ModelError(f"{path}: the GGUF file holds no tokenizer (no tokenizer.ggml.model in its metadata); "
                         "give tokenizer.path an HF tokenizer directory of the same model")
    if kind != "gpt2":
        raise ModelError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: 'gpt2', byte-level "
                         "BPE); give tokenizer.path an HF tokenizer directory of the same model")
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _GGUF_PRE:
        raise ModelError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported (supported: {', '.join(_GGUF_PRE)}); "
                         "give tokenizer.path an HF tokenizer directory of the same model")
    split, digits, ignore_merges = _GGUF_PRE[pre]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges") or []]
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ModelError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens; the file is corrupt")
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tk.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _GGUF_USER_DEFINED])

    def token(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[int(i)] if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        def template(*parts: str) -> str:  # each sequence as "<bos>:i $X:i <eos>:i"
            out = []
            for i, part in enumerate(parts):
                out += ([f"{bos}:{i}"] if add_bos else []) + [f"{part}:{i}"] + ([f"{eos}:{i}"] if add_eos else [])
            return " ".join(out)

        specials = [(t, vocab[t]) for t in dict.fromkeys(([bos] if add_bos else []) + ([eos] if add_eos else []))]
        tk.post_processor = processors.TemplateProcessing(single=template("$A"), pair=template("$A", "$B"),
                                                          special_tokens=specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=bos, eos_token=eos, unk_token=token("unknown_token_id"),
        pad_token=token("padding_token_id"), chat_template=meta.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False, model_max_length=int(
            next((v for k, v in meta.items() if k.endswith(".context_length")), 2**30)))


def _eos_ids(tokenizer, path: pathlib.Path) -> tuple[int, ...]:
    ids: list[int] = []
    if tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    gen_config = path / "generation_config.json"
    if gen_config.is_file():
        try:
            extra = json.loads(gen_config.read_text()).get("eos_token_id")
        except json.JSONDecodeError as e:
            raise ModelError(f"{gen_config}: invalid JSON ({e}); fix or remove the file") from e
        for i in [extra] if isinstance(extra, int) else (extra or []):
            if int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ModelError(
            f"tokenizer in {str(path)!r} has no eos_token and generation_config.json names no eos_token_id; "
            "rollouts could never stop. Set eos_token in tokenizer_config.json."
        )
    return tuple(ids)


def _unused_special_pad(tokenizer, avoid: set[int]) -> int | None:
    """An existing added token that no text or template produces, to pad with.

    Chosen by name, not by the `special` flag: Qwen2.5 marks `<|fim_pad|>` non-special.
    """
    specials = {int(i): str(t) for i, t in tokenizer.added_tokens_decoder.items()}
    ranked = [
        sorted(i for i, s in specials.items() if _PAD_NAME.search(s) and not _MEDIA_NAME.search(s)),
        sorted(i for i, s in specials.items() if _RESERVED_NAME.search(s)),
        sorted(i for i, s in specials.items() if s in _FREE_NAMES),
        # Llama-2 style sentencepiece tokenizers have nothing else; <unk> is the usual pad there.
        [tokenizer.unk_token_id] if tokenizer.unk_token_id is not None else [],
    ]
    for group in ranked:
        for i in group:
            if i not in avoid:
                return i
    return None


def load_tokenizer(path_or_name: str | pathlib.Path = TINY, *, vocab_size: int | None = None):
    """Load a tokenizer from local files, left-padding, with a pad id distinct from every EOS id.

    Args:
      path_or_name: "tiny" (the shipped benchmark tokenizer), a local directory, or a `.gguf` file (the
        tokenizer and chat template stored in its metadata; see `gguf_tokenizer`).
      vocab_size: the model's embedding rows; if given, every id this function
        hands out (pad, EOS) must be below it.

    Returns the transformers tokenizer; `tokenizer_info(tokenizer)` gives its `TokenizerInfo`.
    """
    from transformers import AutoTokenizer

    path = _resolve(path_or_name)
    if is_gguf_path(path) and path.is_file():
        tokenizer = gguf_tokenizer(path)
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, local_files_only=True)
        except Exception as e:  # transformers/tokenizers raise many types for unreadable files
            raise ModelError(f"tokenizer in {str(path)!r} cannot be loaded ({type(e).__name__}: {str(e)[:300]}); "
                             "check tokenizer.json / tokenizer_config.json there (a truncated or hand-edited "
                             "file?)") from e
    tokenizer.padding_side = "left"
    eos_ids = _eos_ids(tokenizer, path)

    pad_added = False
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in eos_ids:
        old = tokenizer.pad_token
        avoid = set(eos_ids) | ({tokenizer.bos_token_id} if tokenizer.bos_token_id is not None else set())
        pad_id = _unused_special_pad(tokenizer, avoid)
        if pad_id is not None:
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad_id)
        else:
            vocab, name, k = tokenizer.get_vocab(), "<pad>", 0
            while name in vocab:  # e.g. "<pad>" exists but is an EOS id
                k += 1
                name = f"<pad_{k}>"
            tokenizer.add_special_tokens({"pad_token": name})
            pad_added = True
            log.warning(
                "%s: added pad token %r with id %d; the model's embedding must have a row for it",
                path, name, tokenizer.pad_token_id,
            )
        log.info("%s: pad token %r is an EOS id or missing; padding with %r (id %d) so EOS is never masked",
                 path, old, tokenizer.pad_token, tokenizer.pad_token_id)

    if tokenizer.pad_token_id in eos_ids:  # cannot happen with the choices above
        raise AssertionError(f"{path}: pad id {tokenizer.pad_token_id} is one of the EOS ids {eos_ids}")
    info = TokenizerInfo(
        pad_id=int(tokenizer.pad_token_id), eos_ids=eos_ids, vocab_size=len(tokenizer), pad_added=pad_added
    )
    if vocab_size is not None:
        for what, i in [("pad", info.pad_id)] + [("eos", i) for i in eos_ids]:
            if i >= vocab_size:
                hint = " (it was added because no unused special token exists)" if what == "pad" and pad_added else ""
                raise ModelError(
                    f"tokenizer {str(path)!r}: {what} id {i}{hint} is >= the model's vocab_size {vocab_size}; "
                    "resize the model's embedding to cover it, or set an existing unused token as pad_token "
                    "in tokenizer_config.json"
                )
    # The info travels with the tokenizer so that helpers taking just a tokenizer see
    # the same EOS ids (including generation_config.json's) as the rollout.
    setattr(tokenizer, _INFO_ATTR, info)
    return tokenizer


def tokenizer_info(tokenizer) -> TokenizerInfo:
    """The `TokenizerInfo` recorded by `load_tokenizer`; for other tokenizers, read off its attributes."""
    info = getattr(tokenizer, _INFO_ATTR, None)
    if info is not None:
        return info
    if tokenizer.eos_token_id is None or tokenizer.pad_token_id in (None, tokenizer.eos_token_id):
        raise ValueError(
            "tokenizer has no EOS, no pad, or pad == EOS (EOS would be confused with padding); "
            "load it with jaxrl_llm.tokenizer.load_tokenizer, which picks a distinct pad"
        )
    return TokenizerInfo(pad_id=int(tokenizer.pad_token_id), eos_ids=(int(tokenizer.eos_token_id),),
                         vocab_size=len(tokenizer))


def _prompt_ids(tokenizer, prompts: Sequence[Any], chat: bool, add_generation_prompt: bool) -> list[list[int]]:
    for i, p in enumerate(prompts):
        if chat and isinstance(p, str):
            raise TypeError(f"prompt {i} is a string but chat=True expects a list of {{'role', 'content'}} messages")
        if not chat and not isinstance(p, str):
            raise TypeError(f"prompt {i} is {type(p).__name__}, not a string; pass chat=True for message lists")
    if chat:
        for i, messages in enumerate(prompts):
            if not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in messages):
                raise TypeError(f"prompt {i}: every message must be a mapping with 'role' and 'content'")
        # Render to text first, then tokenize without special tokens: the template
        # already holds BOS and role markers where the model expects them.
        texts = [
            tokenizer.apply_chat_template(list(m), tokenize=False, add_generation_prompt=add_generation_prompt)
            for m in prompts
        ]
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


def encode_prompts(
    tokenizer,
    texts_or_messages: Sequence[str] | Sequence[Sequence[Mapping[str, str]]],
    max_length: int,
    *,
    chat: bool = False,
    add_generation_prompt: bool = True,
    truncation: Literal["left", "error"] = "left",
) -> EncodedPrompts:
    """Tokenize prompts into a left-padded [B, max_length] batch with its mask.

    Left padding puts every prompt's last token in the last column, where
    decoding starts for all rows at once. Plain strings get the tokenizer's
    own special tokens (e.g. Llama's BOS); chat=True renders each message list
    with the tokenizer's chat template. A prompt longer than max_length keeps
    its last max_length tokens (truncation="left", which can drop a leading
    BOS) or raises (truncation="error").
    """
    if max_length < 1:
        raise ValueError(f"max_length must be >= 1, got {max_length}")
    if truncation not in ("left", "error"):
        raise ValueError(f"truncation must be 'left' or 'error', got {truncation!r}")
    info = tokenizer_info(tokenizer)
    ids = _prompt_ids(tokenizer, texts_or_messages, chat, add_generation_prompt)

    tokens = np.full((len(ids), max_length), info.pad_id, np.int32)
    mask = np.zeros((len(ids), max_length), bool)
    num_truncated = 0
    for i, row in enumerate(ids):
        if not row:
            raise ValueError(f"prompt {i} is empty after tokenization; generation needs at least one prompt token")
        if len(row) > max_length:
            if truncation == "error":
                raise ValueError(
                    f"prompt {i} has {len(row)} tokens, more than max_length={max_length}; "
                    "raise max_length, shorten the prompt, or pass truncation='left'"
                )
            row = row[-max_length:]
            num_truncated += 1
        tokens[i, max_length - len(row):] = row
        mask[i, max_length - len(row):] = True
    return EncodedPrompts(tokens, mask, num_truncated)


def decode_completions(tokenizer, tokens, mask, *, skip_special_tokens: bool = False) -> list[str]:
    """Text of each row's masked-in tokens, cut at the first EOS (which is not included).

    tokens, mask: [B, T] (numpy or jax arrays).
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask, bool)
    if tokens.ndim != 2 or tokens.shape != mask.shape:
        raise ValueError(f"tokens and mask must both be [B, T]; got {tokens.shape} and {mask.shape}")
    eos = np.asarray(tokenizer_info(tokenizer).eos_ids)
    texts = []
    for row_tokens, row_mask in zip(tokens, mask):
        row = row_tokens[row_mask]
        stops = np.flatnonzero(np.isin(row, eos))
        if stops.size:
            row = row[: stops[0]]
        texts.append(
            tokenizer.decode(row.tolist(), skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)
        )
    return texts

"""Tiers 1 and 2 of the language models: causal language models of Hugging Face
``transformers`` as cfbench backbones, with their tokenisation and their pretrained weights.

**Tier 1, model spec ``gpt2-gcide``**: a small byte-level GPT-2 built from a config, with no
download (`TIER1_CONFIG`): the vocabulary is the 256 byte values of UTF-8 text and nothing
else, the context `CONTEXT` bytes, 4 layers of width 128 (0.87M parameters), no dropout. cfbench
pretrains it once (`pretrain_gpt2_gcide`, run by ``cfbench data fetch gpt2-gcide``) on the
training documents of the GCIDE dictionary (general English definitions; the held-out
documents of ``cfbench.data.text``'s one split are never read) for a fixed budget: `STEPS` Adam
steps of `BATCH` blocks of `CONTEXT` bytes at random offsets of the documents joined by blank
lines, 4.1M bytes in all, about 9 CPU-minutes on one thread. The state dict is cached in
``<data root>/lm/gpt2-gcide/`` as safetensors with a manifest (its SHA-256, the config, the
budget, the final training loss, held-out bits per byte and the command that made it); every
load verifies the SHA-256. The budget is fixed, the bytes are not: another machine's floating
point gives another file, so the checksum is the manifest's, not one recorded in the code.

**Tier 2, model spec ``hf:NAME``**: any causal LM of the Hugging Face hub or a local directory
(``AutoModelForCausalLM``, ``AutoTokenizer``), read from the local cache first and downloaded
only when the hub is reachable and not switched off (``HF_HUB_OFFLINE=1``).

Both are wrapped as `CausalLM`: token ids (B, L) -> next-token logits (B, L, V), with the body
as ``features`` and the output layer as ``head``, where every strategy looks for them
(``cfbench.models.split_head``). A model spec builds the architecture at random (row 0 of R);
the lm-* scenarios' source loads the pretrained state (`load_pretrained`, row 1).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cfbench.data import write_verified
from cfbench.data.text import is_corpus_present, load_corpus, sample_spans, split_documents
from cfbench.errors import CfbenchError

TIER1 = "gpt2-gcide"
CONTEXT = 64
"""Bytes a tier-1 block holds: the model's context, and the block length of the lm-* tasks."""
TIER1_CONFIG: dict[str, Any] = {
    "vocab_size": 256, "n_positions": CONTEXT, "n_embd": 128, "n_layer": 4, "n_head": 4,
    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False,
    "bos_token_id": None, "eos_token_id": None}
"""Tier 1's ``GPT2Config`` (see the module docstring): untied input and output embeddings, so
the head is a layer of its own; no special tokens."""
# Tier 1's pretraining, a fixed budget (see the module docstring).
STEPS = 1000
BATCH = 64
LR = 2e-3
WARMUP = 50
PRETRAIN_SEED = 0
PRETRAIN_CORPUS = "gcide"
EVAL_BYTES = 65_536
"""Held-out bytes scored for the manifest's bits per byte, per corpus."""
FETCH_COMMAND = f"cfbench data fetch {TIER1}"
WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
INSTALL = "pip install 'cfbench[lm]'"


def _transformers() -> Any:
    """The ``transformers`` package, or a one-line CfbenchError naming the extra."""
    try:
        import transformers
    except ImportError:
        raise CfbenchError(f"the language models gpt2-gcide and hf:NAME need transformers: "
                           f"{INSTALL}") from None
    transformers.logging.set_verbosity_error()  # no progress bars or advice in run logs
    return transformers


class _Body(nn.Module):
    """A causal LM's body: token ids (B, L) -> the last hidden states (B, L, H)."""

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        self.transformer = transformer

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.transformer(input_ids=ids, use_cache=False).last_hidden_state


class CausalLM(nn.Module):
    """A ``transformers`` causal LM as a cfbench backbone: the base model as ``features``, the
    output embedding as ``head``; token ids (B, L) -> next-token logits (B, L, V)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise CfbenchError(f"{type(model).__name__} has no linear output layer to use as "
                               "the head")
        self.features = _Body(model.base_model)
        self.head = head

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(ids))


def _hf_name(spec: str) -> str:
    name = spec.partition(":")[2]
    if not name:
        raise CfbenchError(f"bad model spec '{spec}': name a causal LM, e.g. hf:gpt2 or "
                           "hf:/path/to/a/saved/model")
    return name


def build(spec: str, input_shape: tuple[int, ...], n_outputs: int) -> CausalLM:
    """The randomly initialised model of `spec` (``gpt2-gcide`` or ``hf:NAME``) for token
    sequences of `input_shape` (L,) and at most `n_outputs` symbols (draws from the global
    RNG, as every backbone does)."""
    transformers = _transformers()
    if spec == TIER1:
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**TIER1_CONFIG))
    else:
        model = transformers.AutoModelForCausalLM.from_config(
            _from_hub(transformers.AutoConfig, _hf_name(spec)))
    wrapped = CausalLM(model)
    context = getattr(model.config, "n_positions", None) or getattr(
        model.config, "max_position_embeddings", None)
    if len(input_shape) != 1 or (context is not None and input_shape[0] > context):
        raise CfbenchError(f"model '{spec}' reads token sequences (L,) of at most {context} "
                           f"tokens, got inputs of shape {input_shape}")
    if n_outputs > wrapped.head.out_features:
        raise CfbenchError(f"model '{spec}' predicts {wrapped.head.out_features} symbols, the "
                           f"scenario needs {n_outputs}")
    return wrapped


# --- tokens and blocks ---------------------------------------------------------------------

def utf8_bytes(text: str) -> list[int]:
    """Tier 1's tokens: the UTF-8 bytes of `text`."""
    return list(text.encode("utf-8"))


def tokenizer(spec: str) -> tuple[Callable[[str], Sequence[int]], int]:
    """(encode, vocabulary size) of the model named by `spec`: UTF-8 bytes for ``gpt2-gcide``,
    the model's own tokenizer (no special tokens added) for ``hf:NAME``."""
    if spec == TIER1:
        return utf8_bytes, 256
    transformers = _transformers()
    name = _hf_name(spec)
    tok = _from_hub(transformers.AutoTokenizer, name)
    tok.model_max_length = 2**62  # documents are cut into blocks after encoding
    config = _from_hub(transformers.AutoConfig, name)
    size = getattr(config, "vocab_size", None) or len(tok)

    def encode(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    return encode, size


def sample_blocks(texts: Sequence[str], encode: Callable[[str], Sequence[int]], tokens: int,
                  span: int, block: int, generator: torch.Generator
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs N x block, targets N x block shifted by one) for up to `tokens` targets, cut
    from the spans of ``cfbench.data.text.sample_spans`` in whole blocks."""
    inputs, targets = [], []
    for symbols, start, length in sample_spans(texts, encode, tokens, span, generator, block):
        ids = torch.as_tensor(symbols[start:start + length + 1], dtype=torch.long)
        inputs.append(ids[:-1].view(-1, block))
        targets.append(ids[1:].view(-1, block))
    if not targets:
        raise CfbenchError(f"no text holds a block of {block + 1} tokens")
    return torch.cat(inputs), torch.cat(targets)


# --- pretrained weights ----------------------------------------------------------------------

def tier1_dir(root: Path) -> Path:
    """Where the pretrained tier-1 model lives in the data root."""
    return root / "lm" / TIER1


def _verified_tier1(root: Path) -> bytes:
    """The weights file's bytes, checked against the manifest's SHA-256; a one-line
    CfbenchError says how to make them if missing or altered."""
    directory = tier1_dir(root)
    weights, manifest = directory / WEIGHTS, directory / MANIFEST
    if not weights.is_file() or not manifest.is_file():
        raise CfbenchError(f"the pretrained {TIER1} model is not in {directory}; run "
                           f"`{FETCH_COMMAND} --data-root {root}` (pretrains it: about 9 "
                           "CPU-minutes)")
    raw = weights.read_bytes()
    try:
        expected = json.loads(manifest.read_text(encoding="utf-8"))["sha256"]
    except (ValueError, KeyError):
        expected = "(unreadable manifest)"
    digest = hashlib.sha256(raw).hexdigest()
    if digest != expected:
        raise CfbenchError(f"checksum mismatch for {weights}: sha256 {digest[:16]}..., the "
                           f"manifest says {expected[:16]}...; delete {directory} and run "
                           f"`{FETCH_COMMAND}`")
    return raw


def pretrained_state(spec: str, root: Path) -> dict[str, torch.Tensor]:
    """`CausalLM`'s pretrained state dict for `spec`: tier 1's verified cache, or the hub
    model's own weights."""
    transformers = _transformers()  # safetensors comes with it
    if spec == TIER1:
        from safetensors.torch import load

        return load(_verified_tier1(root))
    model = _from_hub(transformers.AutoModelForCausalLM, _hf_name(spec))
    return CausalLM(model).state_dict()


def require_pretrained(spec: str, root: Path) -> None:
    """Fail now, with the one-line error, if tier 1's cache is missing or altered (a hub
    model is checked when its tokenizer and config are read)."""
    if spec == TIER1:
        _verified_tier1(root)


def load_pretrained(spec: str, root: Path, model: nn.Module) -> None:
    """Put `spec`'s pretrained weights into `model` (built by ``build_model(spec, ...)``)."""
    model.load_state_dict(pretrained_state(spec, root))


def _offline() -> bool:
    """Whether the hub is switched off (``HF_HUB_OFFLINE``, read now, not at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "")
    return constants.HF_HUB_OFFLINE or value.upper() in ("1", "ON", "YES", "TRUE")


def _from_hub(loader: Any, name: str) -> Any:
    """``loader.from_pretrained(name)`` from a local directory or the cache, else from the hub
    unless offline; a one-line CfbenchError names the model and how to get it."""
    try:
        return loader.from_pretrained(name, local_files_only=True)
    except (OSError, ValueError) as exc:
        reason = exc
    if not _offline():
        try:
            return loader.from_pretrained(name)
        except (OSError, ValueError) as exc:
            reason = exc
    from huggingface_hub import constants

    why = " ".join(str(reason).split())[:160]
    raise CfbenchError(f"hf:{name}: not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
                       f"nor a local directory, and not downloaded ({why}); with network run "
                       f"`hf download {name}` (huggingface-cli download {name}), or set "
                       "HF_HOME to a cache that holds it")


# --- tier 1's pretraining ----------------------------------------------------------------

def _stream(texts: Sequence[str]) -> torch.Tensor:
    """The UTF-8 bytes of `texts` joined by blank lines, as one uint8 tensor."""
    joined = b"\n\n".join(t.encode("utf-8") for t in texts)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


def _rate(step: int, steps: int) -> float:
    """The learning-rate factor: linear warmup over `WARMUP` steps, then cosine to 10%."""
    if step < WARMUP:
        return (step + 1) / WARMUP
    progress = (step - WARMUP) / max(1, steps - WARMUP)
    return 0.1 + 0.45 * (1.0 + math.cos(math.pi * progress))


def block_loss(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats over every position of a batch of blocks."""
    logits = model(inputs)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def bits_per_byte(model: nn.Module, texts: Sequence[str], nbytes: int = EVAL_BYTES,
                  seed: int = 0, batch: int = 256) -> float:
    """Mean -log2 p(next byte) over up to `nbytes` targets of `texts`, in blocks of `CONTEXT`
    bytes drawn as the lm-* scenarios draw them (spans of at most 500 bytes per text)."""
    generator = torch.Generator().manual_seed(seed)
    inputs, targets = sample_blocks(texts, utf8_bytes, nbytes, 500, CONTEXT, generator)
    was_training = model.training
    model.eval()
    nats = sum(float(block_loss(model, inputs[i:i + batch], targets[i:i + batch]))
               * targets[i:i + batch].numel() for i in range(0, len(inputs), batch))
    model.train(was_training)
    return nats / targets.numel() / math.log(2)


def pretrain_gpt2_gcide(root: Path, steps: int = STEPS, eval_bytes: int = EVAL_BYTES,
                        progress: Callable[[int, float], None] | None = None) -> Path:
    """Pretrain tier 1 on GCIDE's training documents for `steps` steps (the fixed budget by
    default; fewer, and fewer `eval_bytes` scored for the manifest, only to test the code path)
    and cache it; returns the directory. `progress(step, loss)` is called every 50 steps."""
    transformers = _transformers()
    from safetensors.torch import save

    corpus = load_corpus(PRETRAIN_CORPUS, root)
    split = split_documents(corpus.documents)
    stream = _stream([d.text for d in split.train])
    started = time.process_time()
    torch.manual_seed(PRETRAIN_SEED)
    model = build(TIER1, (CONTEXT,), 256)
    generator = torch.Generator().manual_seed(PRETRAIN_SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: _rate(k, steps))
    offsets = torch.arange(CONTEXT + 1)
    model.train()
    loss = torch.tensor(math.nan)
    for step in range(steps):
        starts = torch.randint(len(stream) - CONTEXT - 1, (BATCH, 1), generator=generator)
        blocks = stream[starts + offsets].long()
        loss = block_loss(model, blocks[:, :-1], blocks[:, 1:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss = loss.detach()
        if progress is not None and (step + 1) % 50 == 0:
            progress(step + 1, float(loss))
    train_seconds = time.process_time() - started
    heldout = {PRETRAIN_CORPUS: [d.text for d in split.heldout]}
    if is_corpus_present("fortunes", root):
        heldout["fortunes"] = [d.text for d in split_documents(
            load_corpus("fortunes", root).documents).heldout]
    raw = save({k: v.contiguous() for k, v in model.state_dict().items()})
    manifest = {
        "model": TIER1,
        "config": {"model_type": "gpt2", **TIER1_CONFIG},
        "parameters": sum(p.numel() for p in model.parameters()),
        "budget": {"steps": steps, "batch_blocks": BATCH, "block_bytes": CONTEXT,
                   "bytes": steps * BATCH * CONTEXT, "optimizer": "adam", "lr": LR,
                   "betas": [0.9, 0.95], "warmup_steps": WARMUP, "schedule": "cosine to 10%",
                   "grad_clip": 1.0, "seed": PRETRAIN_SEED},
        "corpus": {"name": PRETRAIN_CORPUS, "sha256": corpus.sha256, "split":
                   {"heldout_fraction": split.heldout_fraction, "seed": split.seed},
                   "train_documents": len(split.train)},
        "final_train_loss_nats": float(loss),
        "heldout_bits_per_byte": {name: bits_per_byte(model, texts, eval_bytes)
                                  for name, texts in heldout.items()},
        "cpu_seconds": round(train_seconds, 1),
        "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "sha256": hashlib.sha256(raw).hexdigest(),
        "command": FETCH_COMMAND,
    }
    directory = tier1_dir(root)
    write_verified(directory, {WEIGHTS: raw, MANIFEST: (json.dumps(manifest, indent=1) + "\n")
                               .encode("utf-8")})
    return directory


def fetch_gpt2_gcide(root: Path) -> Path:
    """Make ``<root>/lm/gpt2-gcide/`` hold the verified pretrained model, pretraining it at
    the fixed budget if it is missing or altered; returns the directory."""
    try:
        _verified_tier1(root)
        return tier1_dir(root)
    except CfbenchError:
        pass
    return pretrain_gpt2_gcide(root, progress=lambda step, loss: print(
        f"{TIER1}: step {step}/{STEPS}, training loss {loss:.3f} nats/byte", flush=True))

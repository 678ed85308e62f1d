"""Train the embedded world's tokenizer and language model, resumably, on a CPU.

The model is a plain HF ``GPT2LMHeadModel`` saved with ``save_pretrained``, so it loads through the same
loader as any hub model. Training is step-based and seeded: the batch order is a function of the seed
and the step alone, so a run cut off and resumed from its last checkpoint follows the same path.
Checkpoints (model, optimiser moments, step) are safetensors, never pickles.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.std import tqdm  # text bars everywhere: tqdm.auto needs ipywidgets in notebooks

from sieve.world.corpus import Chunk

__all__ = ["LMConfig", "train_tokenizer", "encode_chunks", "train_lm", "heldout_loss"]

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass(frozen=True)
class LMConfig:
    """Size and schedule of the world's model. Defaults: 4 layers, d=192, 16M tokens."""

    vocab_size: int = 4096
    n_layer: int = 4
    n_embd: int = 192
    n_head: int = 6
    n_ctx: int = 256
    batch_size: int = 32
    tokens: int = 16_000_000
    lr: float = 2e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    regex_upsample: int = 2
    # A second, short phase with code that uses ``re`` much more frequent: the model then reaches for
    # regular expressions where a file imports ``re`` (a behaviour to steer), while files that do not
    # import it stay regex-free.
    regex_phase_steps: int = 300
    regex_phase_upsample: int = 8
    regex_phase_lr: float = 4e-4
    seed: int = 0
    threads: int = 2
    checkpoint_every: int = 100

    @property
    def steps(self) -> int:
        """Steps of the main phase."""
        return self.tokens // (self.batch_size * self.n_ctx)

    @property
    def total_steps(self) -> int:
        return self.steps + self.regex_phase_steps


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE on ``texts`` and save it as a HF fast tokenizer in ``out_dir``.

    Every encoding starts with ``<|endoftext|>`` (the world's BOS), so prompts look like the start of
    a training chunk and the gate can tell BOS from real tokens.

    Example:
        >>> tok = train_tokenizer(["def f(x):\\n    return x\\n"] * 50, 300, tmp_path)  # doctest: +SKIP
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    tk.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, 0)]
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=EOS, eos_token=EOS, pad_token=PAD, unk_token=None
    )
    tok.padding_side = "left"
    tok.model_max_length = 1 << 30
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return tok


def encode_chunks(tok, chunks: list[Chunk]) -> list[list[int]]:
    """Token ids of each chunk's text, BOS first (the tokenizer adds it)."""
    enc = tok([c.text for c in chunks], add_special_tokens=True)["input_ids"]
    return [list(e) for e in enc]


def _stream(
    ids: list[list[int]], chunks: list[Chunk], cfg: LMConfig, epoch: int, phase: int = 1
) -> torch.Tensor:
    """One epoch's token stream: chunks in a seeded order, regex chunks repeated, concatenated."""
    up = cfg.regex_upsample if phase == 1 else cfg.regex_phase_upsample
    order: list[int] = []
    for i, c in enumerate(chunks):
        order.extend([i] * (up if c.uses_regex else 1))
    g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch + (0 if phase == 1 else 500_000))
    perm = torch.randperm(len(order), generator=g).tolist()
    flat: list[int] = []
    for p in perm:
        flat.extend(ids[order[p]])
    n = len(flat) // cfg.n_ctx * cfg.n_ctx
    return torch.tensor(flat[:n], dtype=torch.long).view(-1, cfg.n_ctx)


class _Batches:
    """The batch of any global step, a function of (seed, step) alone: resuming needs no data state."""

    def __init__(self, ids: list[list[int]], chunks: list[Chunk], cfg: LMConfig) -> None:
        self.ids, self.chunks, self.cfg = ids, chunks, cfg
        self.key: tuple[int, int] | None = None
        self.data: torch.Tensor | None = None
        self.per_epoch = {p: _stream(ids, chunks, cfg, 0, p).shape[0] // cfg.batch_size for p in (1, 2)}

    def __call__(self, step: int) -> torch.Tensor:
        phase, local = (1, step) if step < self.cfg.steps else (2, step - self.cfg.steps)
        epoch, pos = divmod(local, self.per_epoch[phase])
        if self.key != (phase, epoch):
            self.data = _stream(self.ids, self.chunks, self.cfg, epoch, phase)
            self.key = (phase, epoch)
        bs = self.cfg.batch_size
        return self.data[pos * bs : (pos + 1) * bs]


def _lr(cfg: LMConfig, step: int) -> float:
    if step >= cfg.steps:
        return cfg.regex_phase_lr
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


def _build_model(cfg: LMConfig, tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(cfg.seed)
    config = GPT2Config(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.n_ctx,
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    return GPT2LMHeadModel(config)


def _save_ckpt(path: Path, model, opt, step: int, cfg: LMConfig, losses: list[float]) -> None:
    tensors = {f"model.{k}": v.contiguous() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                tensors[f"opt.{n}.exp_avg"] = st["exp_avg"]
                tensors[f"opt.{n}.exp_avg_sq"] = st["exp_avg_sq"]
                tensors[f"opt.{n}.step"] = st["step"].reshape(1).float()
    tmp = path.with_suffix(".tmp")
    # GPT-2 ties lm_head to wte: store one copy.
    tensors.pop("model.lm_head.weight", None)
    save_file(tensors, str(tmp), metadata={"step": str(step), "cfg": json.dumps(asdict(cfg)),
                                             "losses": json.dumps(losses[-2000:])})
    tmp.replace(path)


def _load_ckpt(path: Path, model, opt) -> tuple[int, list[float]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in t.items() if k.startswith("model.")}, strict=False)
    model.tie_weights()
    for n, p in model.named_parameters():
        if f"opt.{n}.exp_avg" in t:
            opt.state[p] = {
                "exp_avg": t[f"opt.{n}.exp_avg"],
                "exp_avg_sq": t[f"opt.{n}.exp_avg_sq"],
                "step": t[f"opt.{n}.step"].reshape(()),
            }
    return int(meta["step"]), json.loads(meta["losses"])


def train_lm(
    cfg: LMConfig, tok, chunks: list[Chunk], ids: list[list[int]], out_dir: Path
) -> Path:
    """Train (or resume training) the world's LM; returns the directory of the saved model.

    ``out_dir/ckpt.safetensors`` is written every ``cfg.checkpoint_every`` steps; a run started again
    with the same config resumes from it. The final model goes to ``out_dir/model``.
    """
    torch.set_num_threads(cfg.threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = _build_model(cfg, tok)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    ckpt = out_dir / "ckpt.safetensors"
    step, losses = (0, [])
    if ckpt.exists():
        step, losses = _load_ckpt(ckpt, model, opt)
        log.info("resuming from step %d", step)
    train_idx = [i for i, c in enumerate(chunks) if not c.held_out]
    tr_chunks = [chunks[i] for i in train_idx]
    tr_ids = [ids[i] for i in train_idx]

    batches = _Batches(tr_ids, tr_chunks, cfg)
    model.train()
    bar = tqdm(total=cfg.total_steps, initial=step, desc="world LM", unit="step", mininterval=10)
    t0 = time.time()
    while step < cfg.total_steps:
        x = batches(step)
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step += 1
        bar.update(1)
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / 20:.3f}", phase=batches.key,
                            tok_s=f"{20 * x.numel() / max(1e-9, time.time() - t0):.0f}")
            t0 = time.time()
        if step % cfg.checkpoint_every == 0 or step in (cfg.steps, cfg.total_steps):
            _save_ckpt(ckpt, model, opt, step, cfg, losses)
    bar.close()
    model.eval()
    model_dir = out_dir / "model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    (out_dir / "train_log.json").write_text(json.dumps({"config": asdict(cfg), "losses": losses}))
    return model_dir


@torch.inference_mode()
def heldout_loss(model, ids: list[list[int]], n_ctx: int, batch_size: int = 16) -> float:
    """Mean next-token loss (nats) over the given token sequences, each cut to ``n_ctx`` tokens.

    Example:
        >>> heldout_loss(model, [[0, 5, 6, 7]], n_ctx=256)  # doctest: +SKIP
        3.1
    """
    total, count = 0.0, 0
    seqs = [s[:n_ctx] for s in ids if len(s) > 1]
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        L = max(len(s) for s in batch)
        x = torch.zeros(len(batch), L, dtype=torch.long)
        mask = torch.zeros(len(batch), L, dtype=torch.long)
        for j, s in enumerate(batch):
            x[j, : len(s)] = torch.tensor(s)
            mask[j, : len(s)] = 1
        logits = model(input_ids=x, attention_mask=mask).logits[:, :-1]
        tgt = x[:, 1:]
        m = mask[:, 1:].bool()
        lp = torch.log_softmax(logits.float(), -1).gather(-1, tgt[..., None])[..., 0]
        total += float(-(lp[m]).sum())
        count += int(m.sum())
    return total / max(1, count)

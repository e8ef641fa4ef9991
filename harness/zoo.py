"""The zoo: tiny, architecture-faithful MoE checkpoints trained here, on the embedded corpus.

Each entry is a real transformers class (DeepSeek-V2/V3, Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE) at toy size, trained for a couple of minutes on the CPU on both domains of the
embedded corpus, with a byte-level BPE tokenizer trained here too. That gives every path
of the harness a model with real, domain-specialised routing and no download.

Checkpoints are built on first use and cached under ``cache_dir("zoo")/<name>-<key>``,
where the key hashes everything that shapes the weights (config, recipe, seed, steps,
torch/transformers versions, corpus fingerprint). Builds write to a temporary folder that
is renamed into place, under a file lock, so an interrupted or concurrent build never
leaves a broken entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import corpus
from .data import windows
from .errors import MoebenchError, did_you_mean
from .paths import cache_dir

try:  # POSIX only; elsewhere concurrent builds fall back to rename-wins
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

VOCAB_SIZE = 2048
BOS, EOS, PAD = "<s>", "</s>", "<pad>"  # ids 0, 1, 2: the trainer adds special tokens first
MAX_LENGTH = 1024
RECIPE = 3  # bump when the training recipe changes: it is part of every cache key
EVAL_WINDOWS = 32  # validation windows per domain for the zoo.json figures
# Fixed, because results differ in the last bits between thread counts; 2 is also the
# fastest on a quiet 2-core laptop, and these tiny matmuls gain little from more.
TRAIN_THREADS = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)

# Shared by every entry: a 4-layer, 128-wide decoder with the tokenizer's vocabulary.
COMMON: dict[str, Any] = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    tie_word_embeddings=False,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=2,
    initializer_range=0.02,
)

# DeepSeek multi-head latent attention at toy size: no query compression, like V2-Lite.
MLA = dict(q_lora_rank=None, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=32)


@dataclass(frozen=True)
class ZooEntry:
    """One zoo model: its transformers class, config and training recipe."""

    name: str
    model_class: str  # a transformers class name, e.g. "DeepseekV2ForCausalLM"
    description: str
    settings: dict[str, Any] = field(default_factory=dict)  # config fields on top of COMMON
    steps: int = 500
    lr: float = 3e-3
    batch_size: int = 16
    seq_len: int = 128
    # "aux_loss": DeepSeek-V2's expert-level balance loss on the router logits (its alpha_1 = 0.003);
    # "bias": DeepSeek-V3's auxiliary-loss-free update of e_score_correction_bias.
    balance: str = "aux_loss"
    balance_coef: float = 0.003
    router_lr_mult: float = 3.0  # routers learn slowly in a short run; measured: more specialised, lower ppl
    expert_lr_mult: float = 1.0  # each routed expert sees only top_k/E of the tokens
    expert_weight_decay: float = 0.1
    min_lr: float = 0.1  # the cosine schedule ends at this fraction of the peak

    @property
    def cls(self):
        import transformers

        return getattr(transformers, self.model_class)

    def config(self, **overrides):
        """The toy config (float32, untied embeddings); ``overrides`` replace any field."""
        return self.cls.config_class(**{**COMMON, "dtype": "float32", **self.settings, **overrides})

    def recipe(self) -> dict[str, Any]:
        """What shapes the trained weights besides seed and steps (part of the cache key)."""
        return {
            "model_class": self.model_class,
            "config": {**COMMON, **self.settings},
            "lr": self.lr,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "balance": self.balance,
            "balance_coef": self.balance_coef,
            "router_lr_mult": self.router_lr_mult,
            "expert_lr_mult": self.expert_lr_mult,
            "expert_weight_decay": self.expert_weight_decay,
            "min_lr": self.min_lr,
            "recipe": RECIPE,
        }


ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(
            "deepseek_v2",
            "DeepseekV2ForCausalLM",
            "DeepSeek-V2(-Lite) shape: dense first layer, MLA, 1 shared + 16 fine-grained routed experts, top-4 greedy",
            dict(
                MLA,
                num_key_value_heads=4,
                intermediate_size=384,
                moe_intermediate_size=64,
                n_routed_experts=16,
                num_experts_per_tok=4,
                # Measured (docs/benchmarks.md, issue #13): with V2-Lite's 2 shared experts and
                # unscaled softmax weights (top-4 of 16 sum to ~0.75) the shared experts learnt the
                # common function first, and removing *every* routed expert raised perplexity by
                # only 5%, so expert drop, pruning and quantization ordered by noise. One shared
                # expert, DeepSeek-V2's routed scaling (16 there, for 160 experts; 4 here for 16)
                # and a faster-learning expert group make the routed experts carry the prediction
                # (removing them: +34%) at about the same perplexity.
                n_shared_experts=1,
                first_k_dense_replace=1,
                topk_method="greedy",
                norm_topk_prob=False,
                routed_scaling_factor=4.0,
            ),
            expert_lr_mult=1.5,
            expert_weight_decay=0.0,
            # a third of V2's alpha_1: expert use stays uneven (the most-used half takes ~80% of
            # the slots), so usage statistics carry information, as in the papers' models
            balance_coef=0.001,
        ),
        ZooEntry(
            "deepseek_v3",
            "DeepseekV3ForCausalLM",
            "DeepSeek-V3 shape: dense first layer, MLA, 1 shared + 16 routed experts, sigmoid top-4 "
            "with a trained score-correction bias (aux-loss-free balancing), one expert group",
            dict(
                MLA,
                num_key_value_heads=4,
                intermediate_size=384,
                moe_intermediate_size=64,
                n_routed_experts=16,
                num_experts_per_tok=4,
                n_shared_experts=1,
                n_group=1,
                topk_group=1,
                first_k_dense_replace=1,
                norm_topk_prob=True,
                routed_scaling_factor=2.5,
            ),
            balance="bias",
        ),
        ZooEntry(
            "mixtral",
            "MixtralForCausalLM",
            "Mixtral shape: 8 experts, top-2, grouped-query attention",
            dict(num_key_value_heads=2, intermediate_size=128, num_local_experts=8, num_experts_per_tok=2),
        ),
        ZooEntry(
            "qwen2_moe",
            "Qwen2MoeForCausalLM",
            "Qwen1.5/2-MoE shape: 16 routed experts top-4 plus a sigmoid-gated shared expert",
            dict(
                num_key_value_heads=4,
                intermediate_size=384,
                moe_intermediate_size=64,
                shared_expert_intermediate_size=256,
                num_experts=16,
                num_experts_per_tok=4,
                norm_topk_prob=False,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
            steps=420,  # four MoE layers and a wide shared expert: keeps its build as short as deepseek_v2's
        ),
        ZooEntry(
            "qwen3_moe",
            "Qwen3MoeForCausalLM",
            "Qwen3-MoE shape: 16 experts top-4 with normalised top-k weights, grouped-query attention",
            dict(
                num_key_value_heads=2,
                intermediate_size=384,
                moe_intermediate_size=64,
                num_experts=16,
                num_experts_per_tok=4,
                norm_topk_prob=True,
                decoder_sparse_step=1,
                mlp_only_layers=[],
            ),
        ),
        ZooEntry(
            "olmoe",
            "OlmoeForCausalLM",
            "OLMoE shape: 16 experts top-4, QK-norm attention",
            dict(num_key_value_heads=4, intermediate_size=64, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False),
        ),
    )
}
DEFAULT = "deepseek_v2"


def names() -> list[str]:
    """The zoo's model names (what suites write as ``zoo:NAME``)."""
    return list(ZOO)


def entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``, or a MoebenchError listing the names."""
    if name not in ZOO:
        raise MoebenchError(
            f"unknown zoo model {name!r}{did_you_mean(name, ZOO)}; expected one of {', '.join(ZOO)}"
        )
    return ZOO[name]


def parse_source(text: str) -> tuple[str, dict[str, int]]:
    """``NAME`` or ``NAME?steps=N&seed=S`` (a suite's ``zoo:`` source without the prefix) as ``(name, build options)``.

    A longer training run is the same architecture closer to convergence; benchmarks whose
    effects are small next to an under-trained model's noise use one.
    """
    name, _, query = text.partition("?")
    entry(name)
    options: dict[str, int] = {}
    for part in filter(None, query.split("&")):
        key, _, value = part.partition("=")
        if key not in ("steps", "seed") or not value.isdigit() or (key == "steps" and int(value) < 1):
            raise MoebenchError(f"zoo:{text}: expected zoo:NAME or zoo:NAME?steps=N&seed=S with whole numbers, got {part!r}")
        options[key] = int(value)
    return name, options


def config(name: str, **overrides):
    """The toy config of a zoo model; build a random (untrained) model with ``entry(name).cls(cfg)``."""
    return entry(name).config(**overrides)


# --------------------------------------------------------------------------- tokenizer


def _digest(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _tokenizer_file() -> Path:
    """Train the byte-level BPE once per corpus and tokenizers version; later calls read it."""
    import tokenizers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    key = _digest({"vocab": VOCAB_SIZE, "corpus": corpus.fingerprint(), "tokenizers": tokenizers.__version__})
    path = cache_dir("tokenizers") / f"bpe{VOCAB_SIZE}-{key}.json"
    if path.exists():
        return path
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=[BOS, EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([doc for d in corpus.DOMAINS for doc in corpus.documents(d, "train")], trainer)
    if bpe.get_vocab_size() != VOCAB_SIZE:  # the corpus always has enough merges; guard the config anyway
        raise MoebenchError(f"zoo tokenizer has {bpe.get_vocab_size()} tokens, expected {VOCAB_SIZE}")
    # Rename-wins: concurrent trainers write identical files.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    bpe.save(tmp)
    os.replace(tmp, path)
    return path


def tokenizer(seed: int = 0):
    """The zoo's byte-level BPE tokenizer (``VOCAB_SIZE`` tokens, trained on the embedded train split).

    BPE training is deterministic, so every ``seed`` gives the same tokenizer; the argument
    keeps the zoo's API uniform. No BOS is added automatically (GPT-2 style).
    """
    from transformers import PreTrainedTokenizerFast

    del seed
    return PreTrainedTokenizerFast(
        tokenizer_file=str(_tokenizer_file()),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=MAX_LENGTH,
    )


# --------------------------------------------------------------------------- training


def _stream(tok, domain: str, split: str) -> torch.Tensor:
    """A split's documents as one token stream, separated by blank lines.

    Documents are encoded one by one, in parallel, by the Rust tokenizer: several times
    faster than one long string, and without the wrapper's warning about texts longer
    than ``model_max_length``.
    """
    backend = tok.backend_tokenizer
    sep = backend.encode("\n\n", add_special_tokens=False).ids
    ids: list[int] = []
    for piece in backend.encode_batch(corpus.documents(domain, split), add_special_tokens=False):
        ids += piece.ids + sep
    return torch.tensor(ids[: -len(sep)], dtype=torch.long)


def _experts_modules(model) -> dict[str, torch.nn.Module]:
    """name -> routed-experts module (transformers 5 packs experts as 3-D ``gate_up_proj``)."""
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(getattr(module, "gate_up_proj", None), torch.nn.Parameter) and module.gate_up_proj.ndim == 3
    }


def _balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Expert-level balance loss (DeepSeek-V2 / Switch), averaged over MoE layers.

    ``sum_e f_e * P_e`` with ``f_e`` an expert's share of the routed slots times E and
    ``P_e`` its mean router probability: 1 when balanced. Computed over the whole mixed
    batch, so it keeps every expert in use without forbidding prose/code specialisation.
    """
    losses = []
    for logits in router_logits:
        probs = logits.float().softmax(-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
        losses.append(probs.shape[-1] * (chosen.mean(0) / top_k * probs.mean(0)).sum())
    return torch.stack(losses).mean()


@torch.no_grad()
def _update_bias(model, router_logits, rate: float = 1e-3) -> None:
    """DeepSeek-V3's aux-loss-free balancing: nudge each expert's bias towards the mean load."""
    routers = [m for m in model.modules() if hasattr(m, "e_score_correction_bias")]
    for router, logits in zip(routers, router_logits):
        scores = logits.float().sigmoid() + router.e_score_correction_bias
        load = torch.bincount(scores.topk(router.top_k, dim=-1).indices.flatten(), minlength=router.num_experts)
        router.e_score_correction_bias += rate * torch.sign(load.float().mean() - load.float())


def _routing_summary(counts: dict[str, dict[str, torch.Tensor]]) -> dict[str, Any]:
    """Per-layer specialisation: prose-vs-code total variation and normalised entropy of expert use."""
    def mean(xs):
        return sum(xs) / len(xs)

    layers, tv = [], []
    entropy, top_half = {d: [] for d in corpus.DOMAINS}, {d: [] for d in corpus.DOMAINS}
    for layer in counts["prose"]:
        dist = {d: counts[d][layer] / counts[d][layer].sum() for d in corpus.DOMAINS}
        layers.append(layer)
        tv.append(0.5 * (dist["prose"] - dist["code"]).abs().sum().item())
        for d in corpus.DOMAINS:
            p = dist[d][dist[d] > 0]
            entropy[d].append((-(p * p.log()).sum() / math.log(dist[d].numel())).item())
            top_half[d].append(dist[d].sort(descending=True).values[: dist[d].numel() // 2].sum().item())
    return {
        "layers": layers,
        "tv_prose_vs_code": [round(x, 4) for x in tv],
        "tv_mean": round(mean(tv), 4),
        "entropy_norm": {d: [round(x, 4) for x in entropy[d]] for d in corpus.DOMAINS},
        "entropy_norm_mean": {d: round(mean(entropy[d]), 4) for d in corpus.DOMAINS},
        # Routed slots that go to the most-used half of the experts (0.5 if uniform): what
        # frequency-based expert dropping at keep_ratio=0.5 would keep.
        "top_half_share_mean": {d: round(mean(top_half[d]), 4) for d in corpus.DOMAINS},
        "expert_share": {d: {layer: [round(x, 4) for x in (c / c.sum()).tolist()] for layer, c in counts[d].items()} for d in corpus.DOMAINS},
    }


@torch.no_grad()
def evaluate(model, tok, seq_len: int = 128, max_windows: int = EVAL_WINDOWS) -> dict[str, Any]:
    """Validation perplexity per domain and routing specialisation (prose vs code expert use)."""
    experts = _experts_modules(model)
    counts: dict[str, dict[str, torch.Tensor]] = {}
    domain = ""

    def record(name):
        def hook(module, args):
            idx = args[1].flatten()
            counts[domain][name] += torch.bincount(idx[idx < module.num_experts], minlength=module.num_experts)

        return hook

    handles = [m.register_forward_pre_hook(record(n)) for n, m in experts.items()]
    was_training = model.training
    model.eval()
    ppl, nll_all, n_all = {}, 0.0, 0
    try:
        for domain in corpus.DOMAINS:
            counts[domain] = {n: torch.zeros(m.num_experts, dtype=torch.long) for n, m in experts.items()}
            text = "\n\n".join(corpus.documents(domain, "validation"))  # as data.load_text + data.encode
            ids = torch.tensor(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids)
            nll, n = 0.0, 0
            for batch in windows(ids, seq_len, max_windows).split(16):
                logits = model(input_ids=batch).logits[:, :-1]
                nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
                n += batch[:, 1:].numel()
            ppl[domain] = round(math.exp(nll / n), 3)
            nll_all, n_all = nll_all + nll, n_all + n
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    ppl["all"] = round(math.exp(nll_all / n_all), 3)
    return {"perplexity": ppl, "routing": _routing_summary(counts)}


def _lr_at(step: int, steps: int, peak: float, floor: float = 0.1) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to ``floor`` times the peak."""
    warmup = max(1, steps // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t)))


@contextlib.contextmanager
def _progress(enabled: bool, label: str, total: int):
    """A rich progress bar on stderr (or a no-op): yields ``advance(loss)``."""
    if not enabled:
        yield lambda loss: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = (
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as bar:
        task = bar.add_task(label, total=total, loss="-")
        yield lambda loss: bar.update(task, advance=1, loss=f"{loss:.3f}")


def train(name: str, steps: int | None = None, seed: int = 0, progress: bool = True, threads: int | None = None):
    """Train a zoo model from scratch; returns ``(model, tokenizer, info)`` (nothing is written).

    Runs on ``threads`` CPU threads (default ``TRAIN_THREADS``; the caller's setting is
    restored after): CPU kernels split their sums by thread count, so a fixed count keeps
    the bits reproducible, and the count is part of the cache key.
    """
    threads = threads_for(threads)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _train(name, steps, seed, progress, threads)
    finally:
        torch.set_num_threads(previous)


def threads_for(threads: int | None) -> int:
    """The thread count a build runs on: a suite's ``[hardware] threads`` when it names one, else ``TRAIN_THREADS``."""
    if threads is not None and int(threads) < 1:
        raise MoebenchError(f"zoo build threads {threads}: expected a positive number")
    return TRAIN_THREADS if threads is None else int(threads)


def training_setup(spec: ZooEntry, model) -> tuple[torch.optim.Optimizer, list]:
    """The build's AdamW with its four parameter groups (routers, routed experts, other matrices,
    vectors), each with its learning-rate multiple, and the trained parameters (for clipping)."""
    params = [p for p in model.parameters() if p.requires_grad]
    routers = {id(m.weight) for m in model.modules() if hasattr(m, "top_k") and isinstance(getattr(m, "weight", None), torch.nn.Parameter)}
    experts = {id(p) for m in _experts_modules(model).values() for p in m.parameters()}
    rest = [p for p in params if id(p) not in routers and id(p) not in experts]
    groups = [
        {"params": [p for p in params if id(p) in routers], "weight_decay": 0.0, "mult": spec.router_lr_mult},
        {"params": [p for p in params if id(p) in experts], "weight_decay": spec.expert_weight_decay, "mult": spec.expert_lr_mult},
        {"params": [p for p in rest if p.ndim >= 2], "weight_decay": 0.1, "mult": 1.0},
        {"params": [p for p in rest if p.ndim < 2], "weight_decay": 0.0, "mult": 1.0},
    ]
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(0.9, 0.95)), params


def train_streams(tok) -> list[torch.Tensor]:
    """The token streams of every embedded domain's train split, in ``corpus.DOMAINS`` order."""
    return [_stream(tok, d, "train") for d in corpus.DOMAINS]


def init_model(spec: ZooEntry, seed: int):
    """The entry's untrained model drawn from ``seed`` (the caller's RNG is left as it was), on the eager experts loop."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.cls(spec.config())
    # The per-expert loop: measured as fast as grouped_mm for these sizes on the CPU, and
    # bitwise reproducible, where CPU grouped_mm varies in the last bits from run to run.
    model.set_experts_implementation("eager")
    return model


def train_step(spec: ZooEntry, model, opt, params: list, streams: list[torch.Tensor], gen: torch.Generator,
               step: int, steps: int) -> float:
    """One step of a zoo build: a batch drawn with ``gen``, the loss, the scheduled update; returns the LM loss."""
    half = spec.batch_size // 2
    # Half prose, half code in every batch, so the routers see both domains side by side.
    batch = torch.cat([
        torch.stack([s[i : i + spec.seq_len] for i in torch.randint(0, s.numel() - spec.seq_len, (n,), generator=gen).tolist()])
        for s, n in zip(streams, (half, spec.batch_size - half))
    ])
    out = model(input_ids=batch, output_router_logits=True)
    logits = out.logits[:, :-1]
    lm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
    top_k = model.config.num_experts_per_tok
    loss = lm + spec.balance_coef * _balance_loss(out.router_logits, top_k) if spec.balance == "aux_loss" else lm
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, steps, spec.lr, spec.min_lr) * group["mult"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if spec.balance == "bias":
        _update_bias(model, out.router_logits)
    return lm.item()


def _train(name: str, steps: int | None, seed: int, progress: bool, threads: int):
    spec = entry(name)
    steps = spec.steps if steps is None else int(steps)
    tok = tokenizer(seed)
    streams = train_streams(tok)
    model = init_model(spec, seed)
    before = evaluate(model, tok, spec.seq_len)
    opt, params = training_setup(spec, model)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    start = time.perf_counter()
    with _progress(progress, f"zoo:{name}", steps) as advance:
        for step in range(steps):
            losses.append(train_step(spec, model, opt, params, streams, gen, step, steps))
            advance(losses[-1])
    seconds = time.perf_counter() - start
    model.eval()
    after = evaluate(model, tok, spec.seq_len)
    tail = losses[-max(1, min(50, steps // 10)) :]
    info = {
        "name": name,
        "model_class": spec.model_class,
        "description": spec.description,
        "seed": seed,
        "steps": steps,
        "batch_size": spec.batch_size,
        "seq_len": spec.seq_len,
        "tokens_seen": steps * spec.batch_size * spec.seq_len,
        "lr": spec.lr,
        "balance": spec.balance,
        "final_loss": round(sum(tail) / len(tail), 4) if tail else None,
        "loss_curve": [round(x, 4) for x in losses[:: max(1, steps // 50)]],
        "train_seconds": round(seconds, 1),
        "threads": threads,
        "params": sum(p.numel() for p in model.parameters()),
        "untrained": before,
        "trained": after,
    }
    return model, tok, info


# --------------------------------------------------------------------------- cache


def _key(spec: ZooEntry, steps: int, seed: int, threads: int = TRAIN_THREADS) -> str:
    import transformers

    return _digest({
        "recipe": spec.recipe(),
        "steps": steps,
        "seed": seed,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "corpus": corpus.fingerprint(),
        "vocab": VOCAB_SIZE,
        "threads": threads,
        "experts_implementation": "eager",
    })


def _remove_stale(root: Path, name: str) -> None:
    """Delete temporary folders left by killed builds: this entry's (we hold its lock) and old ones."""
    for stale in root.glob(".*.tmp*"):
        if stale.name.startswith(f".{name}.tmp") or time.time() - stale.stat().st_mtime > 6 * 3600:
            shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def _locked(lock: Path):
    """Hold an exclusive lock file, so one process builds an entry while others wait for it."""
    with open(lock, "a") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if fcntl is not None:
                fcntl.flock(fh, fcntl.LOCK_UN)


def build(name: str, *, steps: int | None = None, seed: int = 0, force: bool = False, progress: bool = True, threads: int | None = None) -> Path:
    """The folder of a trained zoo model (HF ``save_pretrained`` + tokenizer + ``zoo.json``), training it if needed.

    ``threads``: CPU threads to train on (a suite's ``[hardware] threads``; default ``TRAIN_THREADS``).
    """
    spec = entry(name)
    steps = spec.steps if steps is None else int(steps)
    threads = threads_for(threads)
    root = cache_dir("zoo")
    final = folder(name, steps=steps, seed=seed, threads=threads)
    if (final / "zoo.json").exists() and not force:
        return final
    with _locked(root / f".{final.name}.lock"):
        if (final / "zoo.json").exists() and not force:
            return final  # another process built it while we waited
        _remove_stale(root, final.name)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp"))
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache from other users
        try:
            start = time.perf_counter()
            model, tok, info = train(name, steps=steps, seed=seed, progress=progress, threads=threads)
            import transformers

            from .console import no_transformers_bars

            with no_transformers_bars():  # our own bar already said what is happening
                model.save_pretrained(tmp)
                tok.save_pretrained(tmp)

            info.update(
                build_seconds=round(time.perf_counter() - start, 1),
                key=final.name.rsplit("-", 1)[1],
                corpus=corpus.fingerprint(),
                versions={
                    "torch": torch.__version__,
                    "transformers": transformers.__version__,
                    "python": platform.python_version(),
                },
            )
            (tmp / "zoo.json").write_text(json.dumps(info, indent=1) + "\n")
            for file in tmp.iterdir():
                file.chmod(0o644)
            if final.exists():  # force: move the old entry aside, then swap
                old = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.tmp-old"))
                os.rename(final, old / "entry")
                os.rename(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


def folder(name: str, *, steps: int | None = None, seed: int = 0, threads: int | None = None) -> Path:
    """Where the build of ``name`` with these options lives in the cache (built or not)."""
    spec = entry(name)
    steps = spec.steps if steps is None else int(steps)
    return cache_dir("zoo") / f"{name}-{_key(spec, steps, seed, threads_for(threads))}"


def builds(name: str) -> list[Path]:
    """Every finished build of ``name`` in the cache (any steps, seed or threads)."""
    root = cache_dir("zoo")
    return sorted(p for p in root.glob(f"{name}-*") if (p / "zoo.json").exists()) if root.exists() else []


def path(name: str, **kw) -> Path:
    """The folder of a trained zoo model (alias of :func:`build`, used by model loading)."""
    return build(name, **kw)

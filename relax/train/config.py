"""The training stages' sections: what ``relax sample``, ``sft``, ``filter`` and ``grpo`` read.

One typed dataclass per stage (``SampleConfig``, ``SFTConfig``, ``FilterConfig``,
``GRPOConfig``) and the parts they share (``OptimConfig``, ``RunConfig``,
``WarmupDataConfig``). A preset file holds one section per stage (``sample:``,
``sft:``, ``filter:``, ``grpo:``); a stage reads its own, by the loader of
``relax.config``. Every stage that decodes holds one ``relay:`` section, a
``relax.RelayConfig`` (budget, sampling per model, eos and pad ids: the tokenizer's
unless set).

This module does not build models or optimizers; it only describes them.
"""

import dataclasses

from relax.config import check, check_choice
from relax.mesh import MeshConfig
from relax.relay.config import RelayConfig, SamplingConfig

DTYPES = ("float32", "bfloat16")
"""The dtypes a trained or frozen model may have (``run.dtype``, ``llm_dtype``, ``dtype``)."""


@dataclasses.dataclass
class OptimConfig:
    """AdamW with linear warm-up then decay, and global-norm gradient clipping.

    Attributes:
      learning_rate: peak learning rate (paper: 2e-5 warm-up SFT, 1e-6 GRPO).
      warmup_ratio: fraction of the total optimizer steps spent warming up
        linearly from 0 (paper SFT: 0.03; GRPO: 0).
      decay: "cosine", "linear" or "constant" after the warm-up.
      end_lr_ratio: final learning rate / peak for the decaying schedules.
      weight_decay: AdamW decoupled weight decay (paper: 0.01).
      b1, b2, eps: Adam moments.
      grad_clip: clip the global gradient norm to this (paper: 1.0; 0 = off).
    """

    learning_rate: float = 2e-5
    warmup_ratio: float = 0.03
    decay: str = "cosine"
    end_lr_ratio: float = 0.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0

    def __post_init__(self):
        check(self, "learning_rate", self.learning_rate > 0, "> 0")
        check(self, "warmup_ratio", 0 <= self.warmup_ratio < 1, "in [0, 1)")
        check_choice(self, "decay", ("cosine", "linear", "constant"))
        check(self, "end_lr_ratio", self.end_lr_ratio >= 0, ">= 0")
        check(self, "weight_decay", self.weight_decay >= 0, ">= 0")
        for b in ("b1", "b2"):
            check(self, b, 0 <= getattr(self, b) < 1, "in [0, 1)")
        check(self, "eps", self.eps >= 0, ">= 0")
        check(self, "grad_clip", self.grad_clip >= 0, ">= 0 (0 = no clipping)")


@dataclasses.dataclass
class WarmupDataConfig:
    """How commands are inserted into the SLM's own solutions.

    Attributes:
      max_commands: each solution gets k ~ Uniform{0..max_commands} commands
        at distinct random token boundaries (paper code: 3).
      mantissa_max, max_exponent: n = m * 10^e with m ~ U{1..mantissa_max},
        e ~ U{0..max_exponent}, so n spreads over orders of magnitude
        (default 1..9000). Never the empty ``<call></call>``.
      template: the command text; ``{n}`` is replaced by n.
    """

    max_commands: int = 3
    mantissa_max: int = 9
    max_exponent: int = 3
    template: str = "<call>{n}</call>"


@dataclasses.dataclass
class RunConfig:
    """What every training run shares: paths, devices, checkpoints, logging.

    Attributes:
      output_dir: checkpoints (``ckpt/``), metrics (``metrics.jsonl``, TensorBoard
        events) and the exported model (``final/``) go here.
      seed: one seed for data order, command insertion, rollouts and init.
      dtype: parameter/compute dtype of the trained model, "float32" or "bfloat16".
      num_devices: devices of each process the stage's mesh spans (0 = all);
        the mesh section then lays them out (``mesh.data=-1`` takes all of them).
      micro_batch_size: sequences per row shard (a device of data x fsdp) per
        forward/backward; gradients
        of a step's micro-batches are accumulated exactly before the update.
      logprob_chunk: positions (over the micro-batch's flattened B x T) per
        LM-head chunk of the training forward: the losses never hold
        [B, T, V] logits, only [logprob_chunk, V] at a time, recomputed in
        the backward (``relax.train.logprobs``). 1024 x Qwen3's 151936 vocab
        is 0.6 GB of float32 logits; results do not depend on it.
      remat: the training forward recomputes each layer in the backward,
        keeping only the layer inputs ([B, T, D] per layer).
      checkpoint_every: save every this many optimizer steps (0 = only at the end).
      keep_checkpoints: how many recent checkpoints to keep.
      log_every: write metrics every this many steps.
      export: write the final model with ``relax.save_hf`` (+ tokenizer files).
      kill_at_step: test hook; SIGKILL this process after that step (0 = never).
    """

    output_dir: str = "runs/train"
    seed: int = 0
    dtype: str = "float32"
    num_devices: int = 0
    micro_batch_size: int = 1
    logprob_chunk: int = 1024
    remat: bool = True
    checkpoint_every: int = 50
    keep_checkpoints: int = 3
    log_every: int = 1
    export: bool = True
    kill_at_step: int = 0

    def __post_init__(self):
        check(self, "output_dir", bool(self.output_dir), "a folder")
        check_choice(self, "dtype", DTYPES)
        check(self, "num_devices", self.num_devices >= 0, ">= 0 (0 = all)")
        for name in ("micro_batch_size", "logprob_chunk", "keep_checkpoints"):
            check(self, name, getattr(self, name) >= 1, ">= 1")
        for name in ("checkpoint_every", "log_every", "kill_at_step"):
            check(self, name, getattr(self, name) >= 0, ">= 0 (0 = never)")


@dataclasses.dataclass
class SFTConfig:
    """Warm-up SFT: cross-entropy on response tokens of command-augmented solutions.

    Attributes:
      model: HF checkpoint directory of the SLM, or "" to build a random model
        from ``model_config`` (tiny CPU runs and tests).
      model_config: ``relax.ModelConfig`` fields for a random model.
      tokenizer: tokenizer directory ("" = the model directory).
      data: JSONL of {"question", "response"} (text) or {"prompt_ids",
        "response_ids"} (pre-tokenized) rows.
      max_len: prompt + response tokens per sequence; longer rows are dropped.
      batch_size: sequences per optimizer step, over all devices and hosts
        (paper: 32).
      epochs: passes over the data; ``steps`` > 0 caps the optimizer steps.
      enable_thinking: Qwen3 thinking mode in the prompts' chat template (the paper:
        off); rows that ``relax sample`` wrote with another setting are refused.
    """

    model: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)
    tokenizer: str = ""
    data: str = ""
    enable_thinking: bool = False
    max_len: int = 4096
    batch_size: int = 32
    epochs: int = 1
    steps: int = 0
    warmup_data: WarmupDataConfig = dataclasses.field(default_factory=WarmupDataConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """The device mesh (relax.mesh): ``mesh.fsdp=8`` etc.; default all devices on data."""

    def __post_init__(self):
        check(self, "max_len", self.max_len >= 2, ">= 2 (a prompt token and a target)")
        check(self, "batch_size", self.batch_size >= 1, ">= 1")
        _check_steps(self)


def _check_steps(cfg):
    """epochs >= 1 and steps >= 0: a run that trains nothing would export its initial weights."""
    check(
        cfg,
        "epochs",
        cfg.epochs >= 1,
        ">= 1",
        "a run that trains nothing exports untrained weights",
    )
    check(cfg, "steps", cfg.steps >= 0, ">= 0 (0 = no cap)", "steps only caps epochs x batches")


@dataclasses.dataclass
class GRPOConfig:
    """GRPO with relay rollouts (symbols of the paper in brackets).

    Attributes:
      slm: HF directory of the warm-up SLM (the policy pi_theta, also the frozen
        reference pi_ref of the KL); "" = random ``model_config`` (tests).
      llm: HF directory of the teacher LLM ("" = random ``llm_config``).
      llm_dtype: the frozen teacher's dtype (the trained SLM uses ``run.dtype``).
      tokenizer: tokenizer directory ("" = the slm directory).
      data: JSONL of {"question", "answer"} rows (filtered problems).
      group_size: [G] rollouts per prompt (paper: 8).
      prompts_per_step: prompts per rollout batch (paper: 128).
      mini_batch_prompts: prompts per optimizer update; a rollout batch gives
        prompts_per_step / mini_batch_prompts updates (paper: 32 -> 4).
      max_prompt_len: prompts are left as is up to this many tokens (longer dropped).
      reward: "difficulty_aware" (paper), "simple" (correct - rho) or "accuracy".
      scale_rewards: divide each group's centred rewards by the group's std
        (GRPO and the paper; default) or not (False: Dr. GRPO, TRL's
        ``scale_rewards="none"``): then a group whose rewards differ only by a
        small bonus gets small advantages, not unit-scale ones.
      clip_low, clip_high: [epsilon_low, epsilon_high] ratio clip (0.2, 0.3).
      dual_clip: [c] dual-clip bound for negative advantages (3.0).
      kl_coef: [beta] weight of the k3 KL to pi_ref (0.01).
      mask_llm_tokens: LLM-written tokens get no gradient (the paper's loss;
        default). False leaves them in the policy loss as the official code
        does (an ablation: the student is pushed towards text it did not write).
      relay: the rollouts' ``relax.RelayConfig``, the one source of the relay
        settings: ``max_new_tokens`` [budget] SLM + LLM tokens per rollout
        (paper: 8192), ``max_calls`` (paper RL: 2), ``max_call_tokens`` (8192),
        ``slm`` / ``llm`` sampling (paper: 1.0 / 0.7, top-p 1.0). The policy
        pi_theta of the ratio, the old policy and pi_ref of the KL are all
        softmax(logits / ``relay.slm.temperature``), the distribution the
        rollouts sample from (as verl, TRL and tunix do); so ``relay.slm``
        must have top_p 1.0, no top-k and not be greedy: the training
        log-probs do not model truncated sampling (anything else is
        rejected with a ValueError). ``relax grpo`` sets ``eos_ids`` and
        ``pad_id`` from the tokenizer (``relax.tokenizer.special_ids``) unless
        the preset or an override sets them.
      rollout_batch_size: rows (prompts x G, on this host) decoded at once: the
        relay engine's slots; a step's rollouts are one queue on them (a slot
        takes the next row when its row ends), which gives the same tokens as one
        call (a row's samples depend on the key and its row index in the step only). Bounds the two KV caches: Qwen3-1.7B +
        Qwen3-8B in bfloat16 hold ~3.2 GB per row at 12k slots. 0 = all rows
        of the step in one call. Must divide the host's rows of a step and be
        a multiple of the host's row shards (its devices of data x fsdp).
      rollout_dtype: "bfloat16" or "float32" (default; no copy on a data-parallel
        mesh): the SLM decodes from a copy of the float32 master params cast to
        this dtype (and placed by the mesh's "serve" rules) once per step, and
        computes and caches in it (``RelayRollout`` builds the bfloat16
        model; a custom rollout must accept such params).
        The real presets use "bfloat16". The training forward (ratio, KL,
        loss) always uses the master params, so decode rounding never enters
        the ratio.
      epochs, steps: passes over the data; ``steps`` > 0 caps rollout steps.
      enable_thinking: Qwen3 thinking mode in the prompts' chat template (the paper: off).
    """

    slm: str = ""
    llm: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)
    llm_config: dict = dataclasses.field(default_factory=dict)
    llm_dtype: str = "bfloat16"
    tokenizer: str = ""
    data: str = ""
    group_size: int = 8
    prompts_per_step: int = 128
    mini_batch_prompts: int = 32
    max_prompt_len: int = 4096
    enable_thinking: bool = False
    reward: str = "difficulty_aware"
    scale_rewards: bool = True
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    mask_llm_tokens: bool = True
    relay: RelayConfig = dataclasses.field(
        default_factory=lambda: RelayConfig(
            max_new_tokens=8192,
            max_calls=2,
            max_call_tokens=8192,
            slm=SamplingConfig(temperature=1.0),
            llm=SamplingConfig(temperature=0.7),
        )
    )
    rollout_batch_size: int = 64
    rollout_dtype: str = "float32"
    epochs: int = 1
    steps: int = 0
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(learning_rate=1e-6, warmup_ratio=0.0, decay="constant")
    )
    run: RunConfig = dataclasses.field(default_factory=lambda: RunConfig(output_dir="runs/grpo"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """The device mesh (relax.mesh): ``mesh.fsdp=8`` etc.; default all devices on data."""

    def __post_init__(self):
        # rollout_dtype is checked with the sampling settings (grpo_train.check_sampling).
        for name in ("group_size", "prompts_per_step", "mini_batch_prompts", "max_prompt_len"):
            check(self, name, getattr(self, name) >= 1, ">= 1")
        check(self, "rollout_batch_size", self.rollout_batch_size >= 0, ">= 0 (0 = all rows)")
        check_choice(self, "reward", ("difficulty_aware", "simple", "accuracy"))
        check_choice(self, "llm_dtype", DTYPES)
        for name in ("clip_low", "clip_high", "kl_coef"):
            check(self, name, getattr(self, name) >= 0, ">= 0")
        check(self, "dual_clip", self.dual_clip > 1, "> 1")
        _check_steps(self)


@dataclasses.dataclass
class FilterConfig:
    """Teacher filtering: keep problems the LLM solves in more than min_pass_rate of k samples (default: at least once in 16).

    Attributes:
      llm: HF directory of the teacher.
      tokenizer: tokenizer directory ("" = the llm directory).
      data: JSONL of {"question", "answer"} rows.
      output: JSONL written with every kept row plus "pass_rate".
      k: samples per problem (paper: 16).
      min_pass_rate: keep a problem when pass rate > this (default 0: solved at least once).
      batch_size: prompts per generate call (each expanded to k rows).
      relay: the teacher's decoding, a ``relax.RelayConfig``: ``max_new_tokens`` per
        sample and ``llm`` the teacher's own sampling (paper: 8192, temperature 0.7,
        top-p 0.95); eos and pad ids: the tokenizer's unless set. The teacher decodes
        alone (no command is honoured), so the rest of the section does not apply.
      seed: sampling seed.
      limit: only the first ``limit`` problems (0 = all).
      enable_thinking: Qwen3 thinking mode in the teacher's prompts (the paper: off);
        recorded in every row written.
    """

    llm: str = ""
    tokenizer: str = ""
    data: str = ""
    output: str = "runs/filtered.jsonl"
    k: int = 16
    min_pass_rate: float = 0.0
    batch_size: int = 8
    relay: RelayConfig = dataclasses.field(
        default_factory=lambda: RelayConfig(
            max_new_tokens=8192, llm=SamplingConfig(temperature=0.7, top_p=0.95)
        )
    )
    seed: int = 0
    limit: int = 0
    enable_thinking: bool = False
    dtype: str = "bfloat16"
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    """The device mesh (relax.mesh): ``mesh.fsdp=8`` etc.; default all devices on data."""

    def __post_init__(self):
        for name in ("k", "batch_size"):
            check(self, name, getattr(self, name) >= 1, ">= 1")
        check(self, "min_pass_rate", 0 <= self.min_pass_rate < 1, "in [0, 1)")
        check(self, "limit", self.limit >= 0, ">= 0 (0 = all)")
        check_choice(self, "dtype", DTYPES)


@dataclasses.dataclass
class SampleConfig:
    """The SLM's own solutions: k samples per problem, the correct ones kept (relax sample).

    Attributes:
      model: HF directory of the SLM; "" = a random model of ``model_config`` (tests).
      model_config: ``relax.ModelConfig`` fields for a random model.
      tokenizer: tokenizer directory ("" = the model directory; ``synthetic``: the
        synthetic task's, written beside ``output``).
      data: JSONL of {"question", "answer"} rows, or ``synthetic:N[:seed]``.
      output: JSONL of the correct solutions, {"question", "answer", "response", ...}:
        the ``data`` of ``relax sft``; ``<output>.all.jsonl`` records every problem.
      k: samples per problem.
      relay: the SLM's decoding, a ``relax.RelayConfig``: ``max_new_tokens`` per sample
        and ``slm`` its sampling; eos and pad ids: the tokenizer's unless set. The SLM
        decodes alone (no command is honoured).
      batch_size: problems per generate call (each expanded to k rows).
      enable_thinking: Qwen3 thinking mode in the chat template (the paper: off).
      seed: sampling seed.
      limit: only the first ``limit`` problems (0 = all).
      dtype: the SLM's dtype.
    """

    model: str = ""
    model_config: dict = dataclasses.field(default_factory=dict)
    tokenizer: str = ""
    data: str = ""
    output: str = "runs/solutions.jsonl"
    k: int = 4
    relay: RelayConfig = dataclasses.field(
        default_factory=lambda: RelayConfig(
            max_new_tokens=8192, slm=SamplingConfig(temperature=1.0)
        )
    )
    batch_size: int = 8
    enable_thinking: bool = False
    seed: int = 0
    limit: int = 0
    dtype: str = "bfloat16"

    def __post_init__(self):
        for name in ("k", "batch_size"):
            check(self, name, getattr(self, name) >= 1, ">= 1")
        check(self, "output", bool(self.output), "a JSONL path")
        check(self, "limit", self.limit >= 0, ">= 0 (0 = all)")
        check_choice(self, "dtype", DTYPES)

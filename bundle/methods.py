"""The method registry: every adapter method peft-export knows, and how each mode treats it.

One entry per method (PEFT's `PeftType` values, LoRA's rsLoRA / DoRA variants, and methods
from other libraries), so supporting a method is one entry plus its graph piece. Pure data:
the runtimes import it without torch or peft. `merged` says whether PEFT's own
`merge_and_unload` folds the adapter into the weights; `runtime` names the graph inputs the
adapter arrives through (RUNTIME_INPUTS), or is None with the reason in `runtime_refusal`.
`peft-export methods` prints this table and the README's method table is generated from it
(exporter/method_table.py); tests/test_method_registry.py fails when it no longer covers
every PeftType of the installed peft.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

BANKS = "banks"
"""A/B bank inputs read as stored (low-rank factors, scale folded into B)."""
BANKS_SCALES = "banks+scales"
"""Bank inputs plus per-slot output/input scales (DoRA magnitude ratio, IA3 vectors)."""
BANKS_FACTORED = "banks (exact factorisation)"
"""A/B banks filled by an exact low-rank factorisation (SVD in float64) of the dense delta
that PEFT's own merge computes; refused, naming the rank, when it exceeds the banks' rank."""
PREFIX_KV = "prefix KV"
PROMPT_EMBEDS = "prompt embeds"
ADAPTION_KV = "adapter K/V + gate"
TOKEN_BANKS = "token banks"
"""Per-slot embedding rows and an exact output-head delta (`tokens.*`, bundle/token_inputs.py)."""
BOTTLENECK_BANKS = "bottleneck banks"
"""Per-slot down/up banks, the activation between them (`bottleneck.*`, bundle/bottleneck.py)."""
NORM_BANKS = "norm banks"
"""Per-slot norm weight/bias over the base's (`norm.*`, bundle/norm_banks.py)."""
RUNTIME_INPUTS = (
    BANKS,
    BANKS_SCALES,
    BANKS_FACTORED,
    PREFIX_KV,
    PROMPT_EMBEDS,
    ADAPTION_KV,
    TOKEN_BANKS,
    BOTTLENECK_BANKS,
    NORM_BANKS,
)
BANK_INPUTS = (BANKS, BANKS_SCALES, BANKS_FACTORED)
"""Runtime inputs that are LoRA banks: such adapters are served by the bank planner."""

MERGED_BY_PEFT = "PEFT merge_and_unload"


@dataclass(frozen=True)
class Method:
    """One adapter method and what each export mode does with it."""

    name: str
    """The id used by --method, --methods, manifests and adapter files (lower case)."""
    label: str
    """How people write it (README, `peft-export methods`)."""
    peft_type: str | None
    """The `PeftType` value of its adapter_config.json; None for non-PEFT formats."""
    merged: bool
    """PEFT's own merge folds it into the base weights (merged mode)."""
    runtime: str | None = None
    """The graph inputs it arrives through in runtime mode (one of RUNTIME_INPUTS)."""
    how: str = ""
    """How it enters the graph, in a few words (README column)."""
    merge_refusal: str = ""
    """Why merged mode refuses it, with the fix (set exactly when `merged` is False)."""
    runtime_refusal: str = ""
    """Why runtime mode refuses it, with the fix (set exactly when `runtime` is None)."""
    needs_base_weights: bool = False
    """Its runtime tensors depend on the base weights of its target modules (DoRA's norm,
    rotations and other multiplicative deltas): the bundle keeps them (_base_targets)."""
    config_flag: str | None = None
    """A LoRA config flag that turns a LoRA adapter into this variant (use_dora, ...)."""
    index_parts: tuple[str, ...] = ()
    """Saved tensor names (a dotted component of the key) that hold integer indices, not
    weights (SHiRA's sparse positions, FRoD's shared index sets)."""

    @property
    def served(self) -> bool:
        return self.merged or self.runtime is not None


_MERGED_ONLY = "export it with --mode merged"
_ADDS_INPUTS = (
    "it adds inputs rather than weights and cannot be merged; export it with --mode runtime"
)
_SEPARATE = "export each of its LoRA experts as its own adapter with --mode runtime"


def _banks(name: str, label: str, how: str = "banks A/B, scale folded into B", **kw) -> Method:
    return Method(name, label, name.upper(), True, BANKS, how, **kw)


def _factored(
    name: str, label: str, *, base: bool = False, index_parts: tuple[str, ...] = ()
) -> Method:
    how = "exact low-rank SVD of PEFT's merged delta"
    if base:
        how += " W' - W (base weights kept)"
    return Method(
        name,
        label,
        name.upper(),
        True,
        BANKS_FACTORED,
        how,
        needs_base_weights=base,
        index_parts=index_parts,
    )


def _merged_only(name: str, label: str, why: str) -> Method:
    return Method(
        name, label, name.upper(), True, None, "", runtime_refusal=f"{why}; {_MERGED_ONLY}"
    )


def _refused(name: str, label: str, why: str, fix: str) -> Method:
    refusal = f"{why}; {fix}"
    return Method(name, label, name.upper(), False, merge_refusal=refusal, runtime_refusal=refusal)


def _prompt_side(name: str, label: str, runtime: str, how: str) -> Method:
    return Method(name, label, name.upper(), False, runtime, how, merge_refusal=_ADDS_INPUTS)


METHODS: tuple[Method, ...] = (
    _banks("lora", "LoRA (LoRA+, QLoRA adapters)"),
    Method(
        "rslora",
        "rsLoRA",
        "LORA",
        True,
        BANKS,
        "banks A/B, rsLoRA scale folded into B",
        config_flag="use_rslora",
    ),
    Method(
        "dora",
        "DoRA",
        "LORA",
        True,
        BANKS_SCALES,
        "banks + per-slot magnitude ratio (out_scale)",
        needs_base_weights=True,
        config_flag="use_dora",
    ),
    _banks("adalora", "AdaLoRA", "banks (A·E, scale / ranknum folded)"),
    Method(
        "loha",
        "LoHa",
        "LOHA",
        True,
        BANKS_FACTORED,
        "exact low-rank SVD of the delta at its algebraic rank (r²)",
    ),
    Method(
        "lokr",
        "LoKr",
        "LOKR",
        True,
        BANKS_FACTORED,
        "exact low-rank SVD of the delta at its algebraic rank",
    ),
    Method("ia3", "IA3", "IA3", True, BANKS_SCALES, "per-slot out_scale / in_scale (feed-forward)"),
    _factored("vera", "VeRA"),
    _factored("pvera", "PVeRA"),
    _factored("randlora", "RandLoRA"),
    _factored("vblora", "VBLoRA"),
    _factored("unilora", "UniLoRA"),
    _factored("tinylora", "TinyLoRA"),
    _factored("fourierft", "FourierFT"),
    _factored("waveft", "WaveFT"),
    _factored("c3a", "C3A"),
    _factored("shira", "SHiRA", index_parts=("shira_indices",)),
    _factored("miss", "MiSS (Bone)"),
    _factored("delora", "DeLoRA"),
    _factored("gralora", "GraLoRA"),
    _factored("supertuning", "SuperTuning", index_parts=("supertuning_indices",)),
    _factored("oft", "OFT", base=True),
    _factored("boft", "BOFT", base=True),
    _factored("hra", "HRA", base=True),
    _factored("road", "RoAd", base=True),
    _factored("glora", "GLoRA", base=True),
    _factored("hira", "HiRA", base=True),
    _factored("frod", "FRoD", base=True, index_parts=("frod_s_indices", "frod_s_size")),
    _factored("osf", "OSF", base=True),
    _factored("psoft", "PSOFT", base=True),
    _factored("peanut", "PEANuT", base=True),
    _factored("deft", "DEFT", base=True),
    _factored("adamss", "AdaMSS (needs scikit-learn)", base=True),
    Method(
        "ln_tuning",
        "LN tuning",
        "LN_TUNING",
        True,
        NORM_BANKS,
        "per-slot norm weight (+ bias) banks (`norm.*`); slot 0 the base norm",
    ),
    _merged_only(
        "beft",
        "BEFT (bias tuning)",
        "it trains linear biases, which the bank inputs (A/B deltas) do not carry",
    ),
    Method(
        "trainable_tokens",
        "trainable tokens",
        "TRAINABLE_TOKENS",
        True,
        TOKEN_BANKS,
        "per-slot embedding rows + exact head delta (`tokens.*`); also LoRA's "
        "trainable_token_indices and modules_to_save embed_tokens / lm_head",
    ),
    _prompt_side("prefix_tuning", "prefix tuning", PREFIX_KV, "prefix KV as past inputs"),
    _prompt_side("prompt_tuning", "prompt tuning", PROMPT_EMBEDS, "`prompt_embeds` input"),
    _prompt_side(
        "p_tuning",
        "P-tuning",
        PROMPT_EMBEDS,
        "`prompt_embeds` input (encoder evaluated at conversion)",
    ),
    _prompt_side(
        "adaption_prompt",
        "LLaMA-Adapter (AdaptionPrompt)",
        ADAPTION_KV,
        "per-layer adapter K/V + gate inputs",
    ),
    Method(
        "bottleneck",
        "bottleneck adapters (AdapterHub `adapters`: Houlsby, Pfeiffer, parallel)",
        None,
        False,
        BOTTLENECK_BANKS,
        "per-slot down/up banks, the activation between them, residual mix",
        merge_refusal="it is non-linear (an activation between its down and up projections), "
        "so no weight delta expresses it; export it with --mode runtime",
    ),
    _refused(
        "multitask_prompt_tuning",
        "multitask prompt tuning",
        "its prompt depends on a task id passed to every forward, which no graph input carries",
        "train a prompt-tuning adapter per task",
    ),
    _prompt_side(
        "cpt",
        "CPT (context-aware prompt tuning)",
        PROMPT_EMBEDS,
        "`prompt_embeds` input (cpt_token_ids' embeddings + projected delta, as PEFT saves them)",
    ),
    _prompt_side(
        "cartridge",
        "Cartridge",
        PREFIX_KV,
        "its stored KV cache (frozen + trained tokens) as prefix KV past inputs",
    ),
    _refused(
        "poly",
        "Poly",
        "it routes between LoRA skills by a task id passed to every "
        "forward, which no graph input carries",
        _SEPARATE,
    ),
    _refused(
        "xlora",
        "X-LoRA",
        "its LoRA mixing weights come from a classifier run on the "
        "hidden states (two passes per token), not from a fixed delta",
        _SEPARATE,
    ),
    _refused(
        "lily",
        "Lily",
        "PEFT cannot merge it and its experts are mixed by a router "
        "over the input, not a fixed delta",
        "train a LoRA adapter instead",
    ),
    _refused(
        "shadow",
        "ShadowPEFT",
        "its adaptation is an input-dependent side network, not "
        "a weight delta (PEFT cannot merge it)",
        "train a LoRA adapter instead",
    ),
)

_BY_NAME: Mapping[str, Method] = {m.name: m for m in METHODS}


def get_method(name: str) -> Method | None:
    return _BY_NAME.get(name)


def method_names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def served_names() -> tuple[str, ...]:
    """Methods one of the modes exports (what --method accepts)."""
    return tuple(m.name for m in METHODS if m.served)


def merged_names() -> tuple[str, ...]:
    return tuple(m.name for m in METHODS if m.merged)


def bank_names() -> tuple[str, ...]:
    """Methods served by LoRA bank inputs in runtime mode, in registry order."""
    return tuple(m.name for m in METHODS if m.runtime in BANK_INPUTS)


def runtime_names(*inputs: str) -> tuple[str, ...]:
    """Methods whose runtime inputs are among `inputs`."""
    return tuple(m.name for m in METHODS if m.runtime in inputs)


def method_for_config(config: Mapping[str, object]) -> Method | None:
    """The method of a saved PEFT adapter_config.json (None: a type this registry lacks)."""
    peft_type = str(config.get("peft_type", "")).upper()
    candidates = [m for m in METHODS if m.peft_type == peft_type]
    for method in reversed(candidates):  # DoRA's flag wins over rsLoRA's, as in PEFT
        if method.config_flag and config.get(method.config_flag):
            return method
    plain = [m for m in candidates if m.config_flag is None]
    return plain[0] if plain else None

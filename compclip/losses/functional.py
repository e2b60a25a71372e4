"""The public functional API: every loss of CE-CLIP, DeGLA and C2LIP on one (whole) batch (docs/losses.md).

Each function is the matching term of ``compclip.losses.terms`` on a world of one (``terms.Local``): the math
exists once, there. This module adds the positional signatures and keeps nothing but argument wiring.

Shapes: image v, text t [B, D]; negatives n [B, K, D] (flattened image-major: row i·K + k is n_ik);
valid m [B, K] bool; concepts c [P, D]; owner [P] long (image index of each concept); tokens u [B, L, D]. All
features L2-normalised. ``logit_scale`` s is the already exponentiated scale (0-d tensor with a gradient, or a
float); ``logit_bias`` b is a 0-d tensor, a float, or ``None`` (no bias).

Dtypes: float64, float32, float16, bfloat16. Features are cast to their promoted common dtype; arithmetic runs in
float32 (float64 for float64 inputs) and the returned loss has that accumulation dtype.

``backend``: ``"auto"`` (Triton kernels for CUDA tensors, else the PyTorch reference), ``"torch"``, ``"triton"``
(raises ``RuntimeError`` with every reason it cannot run, a missing kernel included). Functions without a
``backend`` argument use ``"auto"``.

Under data parallelism use ``compclip.losses.terms`` instead: the same functions, on the global batch.
"""
from __future__ import annotations

from . import _checks, partials
from .terms import TERMS, Features, Local, cmr_threshold

__all__ = [
    "clip_loss",
    "negclip_loss",
    "ceclip_cmr_loss",
    "ceclip_threshold",
    "ceclip_imc_loss",
    "degla_igc_loss",
    "degla_tgc_loss",
    "degla_distill_loss",
    "siglip_loss",
    "c2lip_npc_loss",
    "concept_attention_pool",
    "c2lip_xac_loss",
]

_NO_FEATURES = dict.fromkeys(Features.__dataclass_fields__)


def _whole_batch(caller: str, term: str, options: dict, **fields):
    """``TERMS[term]`` on ``fields`` as the whole batch (nothing communicated); errors name ``caller``."""
    return TERMS[term](Features(**{**_NO_FEATURES, **fields}), group=Local(caller), **options)


def clip_loss(image, text, logit_scale, *, backend="auto"):
    """CLIP InfoNCE.

    S = s·V·Tᵀ [B, B];  L = ½·(1/B)Σ_i −log softmax_j(S_ij)[i] + ½·(1/B)Σ_i −log softmax_j(S_ji)[i].

    image, text [B, D]; logit_scale 0-d. Returns a 0-d tensor.
    """
    return _whole_batch("clip_loss", "clip", {"backend": backend}, image=image, text=text, logit_scale=logit_scale)


def negclip_loss(image, text, negatives, logit_scale, *, backend="auto"):
    """NegCLIP multi-negative contrastive loss (= CE-CLIP ``itc(hn)`` = DeGLA ``L_base``).

    Image→text: image i against all B captions and all B·K negatives of the batch, logits
    s·v_i·[T; N_flat]ᵀ [B, B + BK], target column i. Text→image: caption i against the B images, target i.
    L = ½(L_I→T + L_T→I), each a mean over the B rows. With K = 0 this is ``clip_loss``.

    image, text [B, D]; negatives [B, K, D]; logit_scale 0-d. Returns a 0-d tensor.
    """
    return _whole_batch("negclip_loss", "negclip", {"backend": backend}, image=image, text=text,
                        negatives=negatives, logit_scale=logit_scale)


def ceclip_cmr_loss(image, text, negatives, valid, logit_scale, threshold):
    """CE-CLIP cross-modal rank loss.

    S_i = s⟨v_i,t_i⟩, S_ik = s⟨v_i,n_ik⟩;
    L = (1/(B·K)) Σ_i Σ_k m_ik · max(0, θ_k + S_ik − S_i)  — invalid entries count as zeros in the mean.

    image, text [B, D]; negatives [B, K, D]; valid m [B, K] bool; logit_scale 0-d; threshold θ [K] (a constant:
    no gradient flows into it, see ``ceclip_threshold``). Returns a 0-d tensor (0 when K = 0).
    """
    return _whole_batch("ceclip_cmr_loss", "cmr", {"threshold": threshold}, image=image, text=text,
                        negatives=negatives, valid=valid, logit_scale=logit_scale)


def ceclip_threshold(image, text, negatives, valid, logit_scale, upper=10.0, previous=None):
    """CE-CLIP adaptive threshold for the next step's CMR loss (no gradient).

    θ_k = clamp( (1/B)Σ_i S_i − Σ_i m_ik S_ik / Σ_i m_ik, 0, upper ) with S_i = s⟨v_i,t_i⟩, S_ik = s⟨v_i,n_ik⟩.
    A type with no valid negative in the batch (Σ_i m_ik = 0) keeps ``previous[k]`` (default 0) instead of
    dividing by zero.

    image, text [B, D]; negatives [B, K, D]; valid [B, K] bool; logit_scale 0-d; previous [K] or None.
    Returns [K] (float64 for float64 inputs, else float32), detached.
    """
    features = Features(image=image, text=text, logit_scale=logit_scale, negatives=negatives, valid=valid)
    theta = cmr_threshold(features, upper=upper, previous=previous, group=Local("ceclip_threshold"))
    return theta.to(_checks.accumulation_dtype(_checks.common_dtype(image, text, negatives)))


def ceclip_imc_loss(image, text, negatives, logit_scale, *, variant="paper", backend="auto"):
    """CE-CLIP intra-modal contrast.

    paper:    L = (1/B) Σ_i −log[ e^{S_i} / (e^{S_i} + Σ_{j,k} e^{s⟨t_i,n_jk⟩}) ],  S_i = s⟨v_i,t_i⟩:
              logits [B, 1 + BK] = [image–text positive, text–text similarity to every negative], target 0.
    released: logits s⟨t_i, n_jk⟩ [B, BK] over the flat negatives with target column 0 for every row (the
              authors' code; it pulls every caption toward image 0's first negative). Needs K ≥ 1.

    image, text [B, D]; negatives [B, K, D]; logit_scale 0-d. Returns a 0-d tensor.
    """
    return _whole_batch("ceclip_imc_loss", "imc", {"variant": variant, "backend": backend}, image=image, text=text,
                        negatives=negatives, logit_scale=logit_scale)


def degla_igc_loss(image, text, negatives, logit_scale, *, backend="auto"):
    """DeGLA image-grounded contrast: each image against its own caption and its own K negatives only.

    L = (1/B) Σ_i −log softmax([s⟨v_i,t_i⟩, s⟨v_i,n_i1⟩ … s⟨v_i,n_iK⟩])[0].

    image, text [B, D]; negatives [B, K, D]; logit_scale 0-d. Returns a 0-d tensor.
    """
    return _whole_batch("degla_igc_loss", "igc", {"backend": backend}, image=image, text=text, negatives=negatives,
                        logit_scale=logit_scale)


def degla_tgc_loss(text, teacher_text, negatives, scale=10.0, *, variant="paper", backend="auto"):
    """DeGLA text-grounded contrast, fixed scale c.

    paper:    L = (1/B) Σ_i −log softmax([c⟨t_i,t*_i⟩, c⟨t_i,n_i1⟩ … c⟨t_i,n_iK⟩])[0]: anchor the student caption,
              positive the teacher's embedding of it (detached), negatives the caption's own K negatives.
    released: the negatives of anchor i are the flat rows i + k·B (k = 0..K−1) of the image-major flat list
              [B·K, D], i.e. mostly other images' negatives (the authors' code).

    text, teacher_text [B, D]; negatives [B, K, D]; scale c (float or 0-d tensor, default 10). Returns a 0-d tensor.
    """
    return _whole_batch("degla_tgc_loss", "tgc", {"variant": variant, "scale": scale, "backend": backend},
                        text=text, teacher_text=teacher_text, negatives=negatives)


def degla_distill_loss(image, text, negatives, teacher_image, teacher_text, teacher_negatives):
    """DeGLA self-distillation toward the EMA teacher, **summed** over the batch and the dimensions.

    L = Σ_i ( ‖v_i − v*_i‖² + ‖t_i − t*_i‖² + Σ_k ‖n_ik − n*_ik‖² ); the teacher features are constants.

    image, teacher_image, text, teacher_text [B, D]; negatives, teacher_negatives [B, K, D]. Returns a 0-d tensor.
    """
    return _whole_batch("degla_distill_loss", "distill", {}, image=image, text=text, negatives=negatives,
                        teacher_image=teacher_image, teacher_text=teacher_text, teacher_negatives=teacher_negatives)


def siglip_loss(image, text, logit_scale, logit_bias):
    """SigLIP sigmoid loss.

    L = −(1/B) Σ_i Σ_j log σ(z_ij (s⟨v_i,t_j⟩ + b)),  z_ij = +1 if i = j else −1  (b = 0 when logit_bias is None).

    image, text [B, D]; logit_scale, logit_bias 0-d. Returns a 0-d tensor.
    """
    return _whole_batch("siglip_loss", "siglip", {}, image=image, text=text, logit_scale=logit_scale,
                        logit_bias=logit_bias)


def c2lip_npc_loss(image, concepts, owner, logit_scale, logit_bias):
    """C2LIP noun-phrase (concept) contrast over every image × every concept of the batch.

    L = −(1/P) Σ_i Σ_p log σ(y_ip (s⟨v_i,c_p⟩ + b)),  y_ip = +1 if owner[p] = i else −1.

    image [B, D]; concepts [P, D]; owner [P] integer in [0, B); logit_scale, logit_bias 0-d (bias may be None).
    Returns a 0-d tensor.
    """
    return _whole_batch("c2lip_npc_loss", "npc", {}, image=image, concepts=concepts, owner=owner,
                        logit_scale=logit_scale, logit_bias=logit_bias)


def concept_attention_pool(tokens, concepts, temperature=1.0, *, backend="auto"):
    """Parameter-free cross-modal attention pooling (C2LIP).

    a_ipl = softmax_l(⟨u_il, c_p⟩ / T),  v̂_ip = normalize(Σ_l a_ipl u_il).

    tokens u [B, L, D] (L2-normalised visual tokens); concepts c [P, D]; temperature T > 0.
    Returns [B, P, D] (float64 for float64 inputs, else float32).
    """
    fn = "concept_attention_pool"
    backend = _checks.backend(fn, backend)
    _, (tokens, concepts) = _checks.prepare(fn, tokens=(tokens, "BLD"), concepts=(concepts, "PD"))
    temperature = _checks.positive(fn, "temperature", temperature)
    return partials.attention_pool(tokens, concepts, temperature, backend)


def c2lip_xac_loss(tokens, concepts, owner, logit_scale, logit_bias, temperature=1.0, *, backend="auto"):
    """C2LIP cross-modal attention contrast: the NPC loss on concept-pooled images.

    L = −(1/P) Σ_i Σ_p log σ(y_ip (s⟨v̂_ip, c_p⟩ + b)),  v̂_ip = ``concept_attention_pool``(u_i, c_p, T),
    y_ip = +1 if owner[p] = i else −1. The [B, P, D] pooled tensor is never built by the Triton kernel.

    tokens [B, L, D]; concepts [P, D]; owner [P] integer in [0, B); logit_scale, logit_bias 0-d (bias may be
    None); temperature T > 0. Returns a 0-d tensor.
    """
    return _whole_batch("c2lip_xac_loss", "xac", {"temperature": temperature, "backend": backend}, tokens=tokens,
                        concepts=concepts, owner=owner, logit_scale=logit_scale, logit_bias=logit_bias)

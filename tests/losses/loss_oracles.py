"""Independent implementations of every loss of docs/losses.md, written from the formulas with explicit Python loops over
rows (small B only) or fully materialised logits, sharing no code with ``compclip.losses``. Float64 throughout.
Also the random-batch factory the loss tests share."""
import torch
import torch.nn.functional as F


def unit(*shape, generator=None, dtype=torch.float64):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1).to(dtype)


def make_batch(B=4, K=3, D=6, P=6, L=3, seed=0, scale=6.0, bias=-2.0):
    """Random normalised features; every image owns at least one concept when P >= B."""
    generator = torch.Generator().manual_seed(seed)
    owner = torch.cat([torch.arange(B), torch.randint(0, B, (max(P - B, 0),), generator=generator)])[:P]
    valid = torch.rand(B, K, generator=generator) > 0.3
    return {
        "image": unit(B, D, generator=generator),
        "text": unit(B, D, generator=generator),
        "negatives": unit(B, K, D, generator=generator),
        "valid": valid,
        "teacher_image": unit(B, D, generator=generator),
        "teacher_text": unit(B, D, generator=generator),
        "teacher_negatives": unit(B, K, D, generator=generator),
        "tokens": unit(B, L, D, generator=generator),
        "concepts": unit(P, D, generator=generator),
        "owner": owner[torch.randperm(P, generator=generator)],
        "logit_scale": torch.tensor(scale, dtype=torch.float64),
        "logit_bias": torch.tensor(bias, dtype=torch.float64),
    }


def _dot(a, b):
    return (a * b).sum()


def _neg_log_softmax_first(logits):
    """−log softmax(logits)[0] of a Python list of 0-d tensors."""
    stacked = torch.stack(logits)
    return torch.logsumexp(stacked, 0) - stacked[0]


def clip(image, text, s):
    logits = s * image @ text.t()
    labels = torch.arange(image.shape[0])
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


def negclip(image, text, negatives, s):
    B, K, D = negatives.shape
    columns = torch.cat([text, negatives.reshape(B * K, D)])
    labels = torch.arange(B)
    return 0.5 * (F.cross_entropy(s * image @ columns.t(), labels) + F.cross_entropy(s * text @ image.t(), labels))


def cmr(image, text, negatives, valid, s, theta):
    B, K, _ = negatives.shape
    total = 0.0
    for i in range(B):
        for k in range(K):
            if valid[i, k]:
                margin = theta[k] + s * _dot(image[i], negatives[i, k]) - s * _dot(image[i], text[i])
                total = total + torch.clamp_min(margin, 0.0)
    return total / (B * K)


def threshold(image, text, negatives, valid, s, upper=10.0, previous=None):
    B, K, _ = negatives.shape
    mean_positive = sum(float(s * _dot(image[i], text[i])) for i in range(B)) / B
    theta = []
    for k in range(K):
        scores = [float(s * _dot(image[i], negatives[i, k])) for i in range(B) if valid[i, k]]
        if scores:
            theta.append(min(max(mean_positive - sum(scores) / len(scores), 0.0), upper))
        else:
            theta.append(0.0 if previous is None else float(previous[k]))
    return torch.tensor(theta, dtype=torch.float64)


def imc_paper(image, text, negatives, s):
    B, K, _ = negatives.shape
    rows = []
    for i in range(B):
        logits = [s * _dot(image[i], text[i])]
        logits += [s * _dot(text[i], negatives[j, k]) for j in range(B) for k in range(K)]
        rows.append(_neg_log_softmax_first(logits))
    return torch.stack(rows).mean()


def imc_released(image, text, negatives, s):
    """Literally the released code: text-to-flat-negatives logits, target column 0 for every row."""
    B, K, D = negatives.shape
    logits = s * text @ negatives.reshape(B * K, D).t()
    return F.cross_entropy(logits, torch.zeros(B, dtype=torch.long))


def grouped(anchors, positives, negatives_per_row, s):
    """(1/B) Σ_i −log softmax([s⟨a_i,p_i⟩, s⟨a_i,n⟩ for n in negatives_per_row[i]])[0]."""
    rows = []
    for i in range(anchors.shape[0]):
        logits = [s * _dot(anchors[i], positives[i])] + [s * _dot(anchors[i], n) for n in negatives_per_row[i]]
        rows.append(_neg_log_softmax_first(logits))
    return torch.stack(rows).mean()


def igc(image, text, negatives, s):
    return grouped(image, text, [list(negatives[i]) for i in range(image.shape[0])], s)


def tgc_paper(text, teacher_text, negatives, c=10.0):
    return grouped(text, teacher_text.detach(), [list(negatives[i]) for i in range(text.shape[0])], c)


def tgc_released(text, teacher_text, negatives, c=10.0):
    B, K, D = negatives.shape
    flat = negatives.reshape(B * K, D)
    return grouped(text, teacher_text.detach(), [[flat[i + k * B] for k in range(K)] for i in range(B)], c)


def distill(image, text, negatives, teacher_image, teacher_text, teacher_negatives):
    total = 0.0
    for i in range(image.shape[0]):
        total = total + ((image[i] - teacher_image[i]) ** 2).sum() + ((text[i] - teacher_text[i]) ** 2).sum()
        for k in range(negatives.shape[1]):
            total = total + ((negatives[i, k] - teacher_negatives[i, k]) ** 2).sum()
    return total


def _log_sigmoid(x):
    return -torch.log1p(torch.exp(-x))


def siglip(image, text, s, b):
    B = image.shape[0]
    bias = 0.0 if b is None else b
    total = 0.0
    for i in range(B):
        for j in range(B):
            z = 1.0 if i == j else -1.0
            total = total - _log_sigmoid(z * (s * _dot(image[i], text[j]) + bias))
    return total / B


def npc(image, concepts, owner, s, b):
    bias = 0.0 if b is None else b
    total = 0.0
    for i in range(image.shape[0]):
        for p in range(concepts.shape[0]):
            y = 1.0 if int(owner[p]) == i else -1.0
            total = total - _log_sigmoid(y * (s * _dot(image[i], concepts[p]) + bias))
    return total / concepts.shape[0]


def pool(tokens, concepts, temperature=1.0):
    B, L, D = tokens.shape
    out = torch.zeros(B, concepts.shape[0], D, dtype=tokens.dtype)
    for i in range(B):
        for p in range(concepts.shape[0]):
            weights = torch.softmax(torch.stack([_dot(tokens[i, l], concepts[p]) / temperature for l in range(L)]), 0)
            pooled = sum(weights[l] * tokens[i, l] for l in range(L))
            out[i, p] = pooled / pooled.norm()
    return out


def xac(tokens, concepts, owner, s, b, temperature=1.0):
    pooled = pool(tokens, concepts, temperature)
    bias = 0.0 if b is None else b
    total = 0.0
    for i in range(tokens.shape[0]):
        for p in range(concepts.shape[0]):
            y = 1.0 if int(owner[p]) == i else -1.0
            total = total - _log_sigmoid(y * (s * _dot(pooled[i, p], concepts[p]) + bias))
    return total / concepts.shape[0]


"""Does the text encoder tell each object's token where that object goes?

Cross-attention lets a U-Net location read the prompt's token states, nothing else. To draw "a red
circle above a blue square" it must find, from the top half, the tokens of the object that goes on
top: the state of "circle" (and of "red") has to say "I am above", and that of "square" "I am below".
"above" alone does not say which object it puts on top; word order does.

This probes exactly that, with no U-Net: a linear classifier (multinomial logistic regression) reads
an object word's state and names the object's role (above / below / left of / right of the other).
Captions are "a C1 S1 REL a C2 S2" over every colour and shape pair; whole scenes (all four
relations of one pair of objects) go either to the training half or to the test half.

- `final`: the encoder's last hidden states, the U-Net's context. High accuracy means the role is
  there, readable by one attention layer; chance (0.25) means the text side is the limit.
- `embedding`: the input embeddings (word + position), which cannot see the relation word. It is the
  control: the probe must stay at chance there, or it is reading something other than the role.

    python benchmarks/text_roles.py
"""
from __future__ import annotations

import itertools

import numpy as np
import torch

from marble.data.captions import canonical_relation, phrase
from marble.data.scene import INVERSE, RELATIONS
from marble.data.shapes import COLORS, SHAPES
from marble.models.text import load_minilm


def captions(tokenizer) -> list[dict]:
    """Every "a C1 S1 REL a C2 S2" with distinct colours and shapes whose words are one word piece
    each, with the token positions of both objects' words and each object's role."""
    pieces = {w: tokenizer.encode(w) for w in (*COLORS, *SHAPES)}
    piece = {w: ids[1] for w, ids in pieces.items() if len(ids) == 3}     # [CLS] word [SEP]
    colors, shapes = [c for c in COLORS if c in piece], [s for s in SHAPES if s in piece]
    rows = []
    for scene, ((c1, c2), (s1, s2)) in enumerate(itertools.product(itertools.permutations(colors, 2),
                                                                    itertools.permutations(shapes, 2))):
        for relation in RELATIONS:
            text = f"{phrase(c1, s1)} {canonical_relation(relation)} {phrase(c2, s2)}"
            ids = tokenizer.encode(text)
            where = {w: ids.index(piece[w]) for w in (c1, s1, c2, s2)}
            rows.append({"text": text, "scene": scene,
                         "objects": [{"color": where[c1], "shape": where[s1], "role": RELATIONS.index(relation)},
                                     {"color": where[c2], "shape": where[s2],
                                      "role": RELATIONS.index(INVERSE[relation])}]})
    return rows


def fit_probe(x: torch.Tensor, y: torch.Tensor, classes: int, weight_decay: float = 1e-3):
    """Multinomial logistic regression on standardised features, full-batch L-BFGS from zero weights
    (deterministic). Returns the classifier: features -> labels."""
    mean, std = x.mean(0), x.std(0).clamp(min=1e-6)
    probe = torch.nn.Linear(x.shape[1], classes, dtype=torch.float64)
    torch.nn.init.zeros_(probe.weight)
    torch.nn.init.zeros_(probe.bias)
    z = ((x - mean) / std).double()
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(probe(z), y) + weight_decay * probe.weight.square().sum()
        loss.backward()
        return loss
    opt.step(closure)

    @torch.no_grad()
    def classify(features: torch.Tensor) -> torch.Tensor:
        return probe(((features - mean) / std).double()).argmax(1)
    return classify


def accuracy(classify, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((classify(x) == y).double().mean())


@torch.inference_mode()
def states(encoder, texts: list[str], batch: int = 256) -> dict[str, torch.Tensor]:
    tokens = encoder.tokenize(texts)
    final, embedding = [], []
    for i in range(0, len(texts), batch):
        t = tokens[i:i + batch]
        final.append(encoder(t).float())
        embedding.append(encoder.embeddings(t).float())
    return {"final": torch.cat(final), "embedding": torch.cat(embedding)}


def role_table(encoder, test_fraction: float = 0.5, seed: int = 0) -> list[dict]:
    rows = captions(encoder.tokenizer)
    feats = states(encoder, [r["text"] for r in rows])
    scenes = sorted({r["scene"] for r in rows})
    test = set(np.random.default_rng(seed).permutation(scenes)[:int(len(scenes) * test_fraction)].tolist())
    out = []
    for layer, word in itertools.product(("final", "embedding"), ("shape", "color")):
        split = {True: ([], []), False: ([], [])}
        for i, r in enumerate(rows):
            for obj in r["objects"]:
                split[r["scene"] in test][0].append(feats[layer][i, obj[word]])
                split[r["scene"] in test][1].append(obj["role"])
        (xtr, ytr), (xte, yte) = ((torch.stack(x), torch.tensor(y)) for x, y in (split[False], split[True]))
        probe = fit_probe(xtr, ytr, len(RELATIONS))
        out.append({"states": layer, "word": word, "train": accuracy(probe, xtr, ytr),
                    "test": accuracy(probe, xte, yte), "n_test": len(yte)})
    return out


def markdown(table: list[dict]) -> str:
    lines = ["| states | object word | train accuracy | test accuracy (chance 0.25) | test tokens |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['states']} | {r['word']} | {r['train']:.3f} | {r['test']:.3f} | {r['n_test']} |" for r in table]
    return "\n".join(lines)


def main() -> None:
    torch.set_num_threads(1)
    print(markdown(role_table(load_minilm())))


if __name__ == "__main__":
    main()
